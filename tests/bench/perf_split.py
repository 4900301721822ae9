#!/usr/bin/env python3
"""tests/bench/perf_split.py PERF.DATA [LABEL]: where a server's CPU time goes.

Reads `perf report` of a `perf record -p PID` (every thread of the server:
its loop, and io_uring's or the thread pool's workers) and sorts each
sample's symbol into one of:

  engine     qsm's own code (the qsm binary or libqsm)
  libc       malloc/free, memcpy/memset and the rest of libc
  loop       libevent
  socket     the kernel's socket side: unix/tcp send and receive, skb
             handling, the copies to and from user memory
  disk       the kernel's file and block side: ext4, iomap, the block
             layer, the I/O scheduler, the virtio doorbell, io_uring's
             request handling
  kmem       the kernel's allocators (slab, memory cgroup accounting)
  syscall    entering and leaving the kernel, epoll, eventfd
  sched      context switches and wake-ups (idle waiting shows up here:
             finish_task_switch is charged when a thread resumes)
  other      the rest of the kernel

and prints one line: LABEL and the percentage of samples per category.
The patterns are name prefixes of Linux 6.x symbols; "other" says how much
they miss.
"""
import re
import subprocess
import sys

KERNEL = [
    ("socket", r"^(unix_|sock_|__sock|skb_|__skb|kfree_skb|consume_skb|alloc_skb|__alloc_skb|"
               r"tcp_|__tcp|inet_|ip_|__ip|_copy_to_iter|_copy_from_iter|copy_page_to_iter|"
               r"copy_page_from_iter|simple_copy_to_iter|__check_object_size|check_heap_object|"
               r"__virt_addr_valid|memcg_slab|__memcg_slab|___sys_sendmsg|____sys_sendmsg|"
               r"__sys_sendmsg|__sys_recvfrom|sendmsg|recvmsg|scm_|maybe_add_creds|"
               r"sock_def_readable|sock_wfree|rep_movs|copy_user|__copy_user|_copy_from_user|"
               r"copy_msghdr|import_iovec|__import_iovec|__get_user|__put_user)"),
    ("disk", r"^(ext4_|__ext4|jbd2_|iomap_|__iomap|blk_|__blk|bio_|__bio|submit_bio|dd_|"
             r"iowrite|ioread|virtblk_|virtqueue_|vring_|vp_|io_|__io_|iov_iter_|gup_|"
             r"__get_user_pages|pin_user_pages|filemap_|folio_|wbt_|rq_qos|kiocb|"
             r"generic_file_|file_modified|aio_|dio_|llist_|sg_|virtio_|sbitmap|mempool_|elv_|"
             r"__dd_|__submit_bio|__rq_qos|atime_|touch_atime|rw_verify_area)"),
    ("syscall", r"^(entry_SYSCALL|do_syscall|syscall_|__x64_sys|x64_sys_call|exit_to_user|"
                r"irqentry_exit|syscall_exit|ep_|do_epoll|__ep_|eventfd_|fdget|__fdget|fput|"
                r"__fget|security_|apparmor_|aa_)"),
    ("kmem", r"^(kmem_cache|kfree|__kmalloc|kmalloc|__slab|slab_|___slab|refill_obj_stock|"
             r"obj_cgroup|page_counter|__account_obj|mod_objcg|drain_obj_stock)"),
    ("sched", r"^(finish_task_switch|__schedule|schedule|try_to_wake_up|ttwu_|__wake_up|"
              r"wake_up|enqueue_|dequeue_|pick_next|update_curr|_raw_spin|raw_spin|"
              r"native_queued|__raw_callee|psi_|select_task_rq|newidle|load_balance|"
              r"update_load|__update_load|hrtimer|__hrtimer|autoremove_wake|"
              r"default_wake_function|pv_|kvm_)"),
]
KERNEL = [(name, re.compile(rx)) for name, rx in KERNEL]


def category(dso, sym):
    if dso.startswith("[kernel") or dso == "[unknown]" and sym.startswith("0xffff"):
        for name, rx in KERNEL:
            if rx.match(sym):
                return name
        return "other"
    if "libc" in dso or "ld-linux" in dso:
        return "libc"
    if "libevent" in dso:
        return "loop"
    if dso in ("qsm", "qemu-nbd") or dso.startswith("libqsm"):
        return "engine"
    if "liburing" in dso:
        return "disk"
    if dso.startswith("libgnutls") or dso.startswith("libnettle") or dso.startswith("libhogweed"):
        return "socket"
    if dso.startswith("libglib") or dso.startswith("libgthread"):
        return "loop"
    return "engine" if dso.startswith("qemu") else "other"


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: perf_split.py PERF.DATA [LABEL]")
    label = sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]
    out = subprocess.run(["perf", "report", "-i", sys.argv[1], "--no-children", "-g", "none",
                          "--sort", "dso,sym", "--stdio", "-F", "overhead,dso,sym"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("perf_split.py: perf report failed: " + out.stderr.strip()[:200])
    shares = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+\[[.k]\]\s+(\S+)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        c = category(dso, sym)
        shares[c] = shares.get(c, 0.0) + pct
    order = ["engine", "libc", "loop", "socket", "disk", "kmem", "syscall", "sched", "other"]
    print("%-22s " % label + " ".join("%s %4.1f%%" % (c, shares.get(c, 0.0)) for c in order))


if __name__ == "__main__":
    main()
