/*
 * The checks the C tests share: CHECK(cond), CHECK_RC(call, expected),
 * OK(call), counted in `passed` and `failed` (each test program defines
 * CHECK_COUNTERS once), and the calling thread's last error message.
 */
#ifndef MESHVPN_TEST_CHECK_H
#define MESHVPN_TEST_CHECK_H

#include <meshvpn.h>

#include <stdatomic.h>
#include <stdio.h>

extern atomic_int passed, failed;
#define CHECK_COUNTERS atomic_int passed, failed

static void last_error(char *buf, size_t len) {
    size_t n = 0;
    if (meshvpn_last_error_message(buf, len, &n) != MESHVPN_OK) {
        snprintf(buf, len, "(message too long)");
    }
}

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (cond) {                                                              \
            passed++;                                                            \
        } else {                                                                 \
            failed++;                                                            \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
        }                                                                        \
    } while (0)

#define CHECK_RC(call, expected)                                                 \
    do {                                                                         \
        meshvpn_result rc_ = (call);                                             \
        if (rc_ == (meshvpn_result)(expected)) {                                 \
            passed++;                                                            \
        } else {                                                                 \
            char msg_[512];                                                      \
            last_error(msg_, sizeof msg_);                                       \
            failed++;                                                            \
            fprintf(stderr, "FAIL %s:%d: %s returned %u, expected %s (%u); last error: %s\n", \
                    __FILE__, __LINE__, #call, (unsigned)rc_, #expected,         \
                    (unsigned)(expected), msg_);                                 \
        }                                                                        \
    } while (0)

#define OK(call) CHECK_RC(call, MESHVPN_OK)

#endif
