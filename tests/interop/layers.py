#!/usr/bin/env python3
"""Layer contents for tests/interop/test_backing.sh (stdlib only).

    layers.py SEED SIZE LAYERS OUTDIR

Writes OUTDIR/layerK.cmds (K = 0 .. LAYERS-1, 0 is the base): qemu-io
commands that fill layer K with random patterns (unaligned writes, zero
writes, v3-style discards are avoided so every qcow2 version agrees), and
OUTDIR/verify.cmds: `read -P` commands covering [0, SIZE) that hold for the
top of the chain built by applying the layers in order, each to its own
image (a layer K image of virtual size SIZE_K reads as zeros past SIZE_K;
OUTDIR/sizes gives SIZE_K per layer, the base being 3/4 of SIZE so reads
past a shorter backing file are covered).
"""
import random
import sys

seed, size, layers, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
sizes = [size * 3 // 4 if k == 0 else size for k in range(layers)]
# model: the guest view of the top image, per 512-byte sector (pattern or 0);
# writes below are sector-granular so one byte per sector is enough.
SEC = 512
model = bytearray(size // SEC)
for k in range(layers):
    lsize = sizes[k]
    cmds = []
    for _ in range(40):
        length = rng.choice([512, 4096, 65536, 3 * 4096, 200 * 512, 300000 // SEC * SEC])
        off = rng.randrange(0, (lsize - length) // SEC) * SEC
        pat = rng.randrange(1, 255)
        if rng.random() < 0.15:
            cmds.append(f"write -z {off} {length}")
            pat = 0
        else:
            cmds.append(f"write -P {pat} {off} {length}")
        model[off // SEC:(off + length) // SEC] = bytes([pat]) * (length // SEC)
    with open(f"{out}/layer{k}.cmds", "w") as f:
        f.write("\n".join(cmds) + "\n")
with open(f"{out}/sizes", "w") as f:
    f.write(" ".join(str(s) for s in sizes) + "\n")
cmds = []
i = 0
n = len(model)
while i < n:
    j = i
    while j < n and model[j] == model[i] and j - i < 2048:
        j += 1
    cmds.append(f"read -P {model[i]} {i * SEC} {(j - i) * SEC}")
    i = j
with open(f"{out}/verify.cmds", "w") as f:
    f.write("\n".join(cmds) + "\n")
