/*
 * tools/nbd/proto.h: the NBD protocol's wire constants (doc/proto.md of
 * github.com/NetworkBlockDevice/nbd), as `qsm nbd` speaks it: fixed
 * newstyle negotiation, simple and structured replies.  All integers on the
 * wire are big-endian.
 */
#ifndef QSM_TOOLS_NBD_PROTO_H
#define QSM_TOOLS_NBD_PROTO_H

#include <stdint.h>

#define NBD_INIT_MAGIC        0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC        0x49484156454F5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC         0x0003e889045565a9ULL /* option replies */
#define NBD_REQUEST_MAGIC     0x25609513U
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698U
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efU

/* Handshake flags (server) and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE 0x1
#define NBD_FLAG_NO_ZEROES      0x2
#define NBD_FLAG_C_FIXED_NEWSTYLE 0x1
#define NBD_FLAG_C_NO_ZEROES      0x2

/* Options. */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10

/* Option reply types. */
#define NBD_REP_ACK          1
#define NBD_REP_SERVER       2
#define NBD_REP_INFO         3
#define NBD_REP_META_CONTEXT 4
#define NBD_REP_ERR(n)       (0x80000000U | (n))
#define NBD_REP_ERR_UNSUP    NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY   NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID  NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN  NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG  NBD_REP_ERR(9)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT      0
#define NBD_INFO_NAME        1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE  3

/* Transmission flags. */
#define NBD_FLAG_HAS_FLAGS         (1U << 0)
#define NBD_FLAG_READ_ONLY         (1U << 1)
#define NBD_FLAG_SEND_FLUSH        (1U << 2)
#define NBD_FLAG_SEND_FUA          (1U << 3)
#define NBD_FLAG_ROTATIONAL        (1U << 4)
#define NBD_FLAG_SEND_TRIM         (1U << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1U << 6)
#define NBD_FLAG_SEND_DF           (1U << 7)
#define NBD_FLAG_CAN_MULTI_CONN    (1U << 8)
#define NBD_FLAG_SEND_CACHE        (1U << 10)
#define NBD_FLAG_SEND_FAST_ZERO    (1U << 11)

/* Commands and their flags. */
#define NBD_CMD_READ         0
#define NBD_CMD_WRITE        1
#define NBD_CMD_DISC         2
#define NBD_CMD_FLUSH        3
#define NBD_CMD_TRIM         4
#define NBD_CMD_CACHE        5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_CMD_FLAG_FUA       (1U << 0)
#define NBD_CMD_FLAG_NO_HOLE   (1U << 1)
#define NBD_CMD_FLAG_DF        (1U << 2)
#define NBD_CMD_FLAG_REQ_ONE   (1U << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1U << 4)

/* Structured reply chunks. */
#define NBD_REPLY_FLAG_DONE         (1U << 0)
#define NBD_REPLY_TYPE_NONE         0
#define NBD_REPLY_TYPE_OFFSET_DATA  1
#define NBD_REPLY_TYPE_OFFSET_HOLE  2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR        32769
#define NBD_REPLY_TYPE_ERROR_OFFSET 32770

/* base:allocation descriptor flags. */
#define NBD_STATE_HOLE 0x1
#define NBD_STATE_ZERO 0x2
/* qemu:dirty-bitmap:NAME descriptor flags. */
#define NBD_STATE_DIRTY 0x1

/* Errors on the wire (the protocol's own numbering, Linux's values). */
#define NBD_EPERM      1
#define NBD_EIO        5
#define NBD_ENOMEM     12
#define NBD_EINVAL     22
#define NBD_ENOSPC     28
#define NBD_EOVERFLOW  75
#define NBD_ENOTSUP    95
#define NBD_ESHUTDOWN  108

/* Sizes. */
#define NBD_REQUEST_SIZE   28
#define NBD_SIMPLE_REPLY_SIZE 16
#define NBD_CHUNK_HEADER_SIZE 20
#define NBD_MAX_PAYLOAD    (32U << 20)  /* largest READ/WRITE (the advertised maximum) */
#define NBD_MAX_STRING     4096         /* export names, descriptions, context names */

#endif
