/*
 * The C ABI of libmeshvpn, exercised from C against the installed header
 * and library: every exported function, with good input and with bad input
 * (NULL everywhere, zero and huge lengths, undersized buffers, double free,
 * use after free through a stale handle), and a two-engine packet exchange
 * over loopback UDP.
 *
 * Built with -Wall -Wextra -Werror by ffi/tests/run-c-tests.sh, which also
 * runs it under valgrind. Prints "N passed, N failed" last; exits non-zero
 * on any failure.
 */
#define _GNU_SOURCE
#include <meshvpn.h>

#include "check.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

CHECK_COUNTERS;

/* A handle value nobody issued. */
#define BOGUS_ENGINE ((meshvpn_engine *)(uintptr_t)0x1234)

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int contains(const char *haystack, const char *needle) {
    return strstr(haystack, needle) != NULL;
}

/* ---------------------------------------------------------------- version */

static void test_version(void) {
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.%d", MESHVPN_VERSION_MAJOR,
             MESHVPN_VERSION_MINOR, MESHVPN_VERSION_PATCH);
    CHECK(strcmp(meshvpn_version(), expected) == 0);
    CHECK(MESHVPN_VERSION_NUMBER ==
          MESHVPN_VERSION_MAJOR * 10000 + MESHVPN_VERSION_MINOR * 100 + MESHVPN_VERSION_PATCH);
}

/* ------------------------------------------------------- results, errors */

static void test_result_messages(void) {
    static const meshvpn_result codes[] = {
        MESHVPN_OK, MESHVPN_PANIC, MESHVPN_NULL_PARAMETER, MESHVPN_INVALID_HANDLE,
        MESHVPN_INVALID_ARGUMENT, MESHVPN_BUFFER_TOO_SMALL, MESHVPN_TIMEOUT,
        MESHVPN_WOULD_DEADLOCK, MESHVPN_UNSUPPORTED, MESHVPN_LOG_UNAVAILABLE,
        MESHVPN_KEY_INVALID, MESHVPN_KEY_LOW_ORDER, MESHVPN_KEY_OWN, MESHVPN_KEY_MISSING,
        MESHVPN_CONFIG_INVALID, MESHVPN_PREFIX_INVALID, MESHVPN_ENDPOINT_INVALID,
        MESHVPN_BIND_FAILED, MESHVPN_THREAD_FAILED, MESHVPN_NO_SUCH_PEER,
        MESHVPN_ENGINE_STOPPED, MESHVPN_PACKET_MALFORMED, MESHVPN_NO_ROUTE,
        MESHVPN_PACKET_DROPPED, MESHVPN_NETWORK_ERROR,
    };
    char buf[256];
    size_t n = 0, needed = 0;
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        OK(meshvpn_result_message(codes[i], NULL, 0, &needed));
        OK(meshvpn_result_message(codes[i], buf, sizeof buf, &n));
        CHECK(n > 0 && n + 1 == needed && strlen(buf) == n);
    }
    /* Stable numbers: spot checks against the published values. */
    CHECK(MESHVPN_OK == 0 && MESHVPN_PANIC == 1 && MESHVPN_INVALID_HANDLE == 3);
    CHECK(MESHVPN_KEY_INVALID == 100 && MESHVPN_NO_ROUTE == 211);

    /* Undersized buffer: refused, untouched. */
    char small[4] = {'x', 'x', 'x', 'x'};
    n = 99;
    CHECK_RC(meshvpn_result_message(MESHVPN_NO_ROUTE, small, sizeof small, &n),
             MESHVPN_BUFFER_TOO_SMALL);
    CHECK(n == 99 && small[0] == 'x' && small[3] == 'x');
    /* Zero-length, non-NULL buffer. */
    CHECK_RC(meshvpn_result_message(MESHVPN_NO_ROUTE, small, 0, &n), MESHVPN_BUFFER_TOO_SMALL);
    /* NULL buffer with a length; NULL out_len. */
    CHECK_RC(meshvpn_result_message(MESHVPN_NO_ROUTE, NULL, 10, &n), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_result_message(MESHVPN_NO_ROUTE, buf, sizeof buf, NULL),
             MESHVPN_NULL_PARAMETER);
    /* A huge declared length over a real buffer that is large enough. */
    OK(meshvpn_result_message(MESHVPN_OK, buf, SIZE_MAX, &n));
    /* Numbers that are no result. */
    CHECK_RC(meshvpn_result_message(12345, buf, sizeof buf, &n), MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_result_message(UINT32_MAX, buf, sizeof buf, &n), MESHVPN_INVALID_ARGUMENT);

    /* The last error is the detailed message of the last failure. */
    CHECK(meshvpn_last_error() == MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_last_error_message(NULL, 0, &needed));
    OK(meshvpn_last_error_message(buf, sizeof buf, &n));
    CHECK(n + 1 == needed && contains(buf, "4294967295"));
    CHECK_RC(meshvpn_last_error_message(buf, 3, &n), MESHVPN_BUFFER_TOO_SMALL);
    CHECK_RC(meshvpn_last_error_message(buf, sizeof buf, NULL), MESHVPN_NULL_PARAMETER);
}

static void test_panic_boundary(void) {
    char msg[256];
    CHECK_RC(meshvpn_test_panic(), MESHVPN_PANIC);
    CHECK(meshvpn_last_error() == MESHVPN_PANIC);
    last_error(msg, sizeof msg);
    CHECK(contains(msg, "forced by a test"));
    /* Still usable. */
    meshvpn_key k;
    OK(meshvpn_key_generate(&k));
    CHECK_RC(meshvpn_test_panic(), MESHVPN_PANIC);
}

/* ------------------------------------------------------------------- keys */

/* `echo <priv> | wg pubkey` (wireguard-tools). */
static const char *VECTOR_PRIV = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
static const char *VECTOR_PUB = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

static void test_keys(void) {
    meshvpn_key priv, pub, back, psk, untouched;
    char b64[MESHVPN_KEY_BASE64_LEN], hex[MESHVPN_KEY_HEX_LEN];
    size_t n = 0;

    OK(meshvpn_key_from_base64(VECTOR_PRIV, &priv));
    OK(meshvpn_key_public(&priv, &pub));
    OK(meshvpn_key_to_base64(&pub, b64, sizeof b64, &n));
    CHECK(n == 44 && strcmp(b64, VECTOR_PUB) == 0);
    OK(meshvpn_key_to_hex(&pub, hex, sizeof hex, &n));
    CHECK(n == 64 && strlen(hex) == 64);
    OK(meshvpn_key_from_hex(hex, &back));
    CHECK(memcmp(back.bytes, pub.bytes, MESHVPN_KEY_LEN) == 0);
    /* In place. */
    back = priv;
    OK(meshvpn_key_public(&back, &back));
    CHECK(memcmp(back.bytes, pub.bytes, MESHVPN_KEY_LEN) == 0);

    OK(meshvpn_key_generate(&priv));
    CHECK((priv.bytes[0] & 7) == 0 && (priv.bytes[31] & 0xc0) == 0x40);
    OK(meshvpn_key_generate_preshared(&psk));
    CHECK(memcmp(psk.bytes, priv.bytes, MESHVPN_KEY_LEN) != 0);

    /* NULL everywhere. */
    CHECK_RC(meshvpn_key_generate(NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_generate_preshared(NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_public(NULL, &pub), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_public(&priv, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_from_base64(NULL, &pub), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_from_base64(VECTOR_PUB, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_from_hex(NULL, &pub), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_from_hex(hex, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_to_base64(NULL, b64, sizeof b64, &n), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_to_base64(&pub, b64, sizeof b64, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_to_hex(NULL, hex, sizeof hex, &n), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_key_to_hex(&pub, NULL, 5, &n), MESHVPN_NULL_PARAMETER);

    /* Bad text; the output stays as it was. */
    memset(&untouched, 0xab, sizeof untouched);
    back = untouched;
    CHECK_RC(meshvpn_key_from_base64("", &back), MESHVPN_KEY_INVALID);
    CHECK_RC(meshvpn_key_from_base64("AAAA", &back), MESHVPN_KEY_INVALID);
    CHECK_RC(meshvpn_key_from_base64("not base64 at all!!", &back), MESHVPN_KEY_INVALID);
    CHECK_RC(meshvpn_key_from_hex("zz", &back), MESHVPN_KEY_INVALID);
    CHECK_RC(meshvpn_key_from_base64("\xff\xfe", &back), MESHVPN_INVALID_ARGUMENT);
    CHECK(memcmp(&back, &untouched, sizeof back) == 0);

    /* Undersized buffers: one byte short, zero. */
    memset(b64, 'x', sizeof b64);
    CHECK_RC(meshvpn_key_to_base64(&pub, b64, MESHVPN_KEY_BASE64_LEN - 1, &n),
             MESHVPN_BUFFER_TOO_SMALL);
    CHECK(b64[0] == 'x');
    CHECK_RC(meshvpn_key_to_hex(&pub, hex, 0, &n), MESHVPN_BUFFER_TOO_SMALL);
    /* Size query. */
    OK(meshvpn_key_to_hex(&pub, NULL, 0, &n));
    CHECK(n == MESHVPN_KEY_HEX_LEN);
}

/* ------------------------------------------------------------- packets */

/* An IPv4/UDP packet of `total` bytes from 10.77.0.<src> to 10.77.0.<dst>. */
static size_t ipv4_udp(uint8_t *p, size_t total, int src, int dst, uint8_t seed) {
    memset(p, 0, total);
    p[0] = 0x45;
    p[2] = (uint8_t)(total >> 8);
    p[3] = (uint8_t)total;
    p[8] = 64;
    p[9] = 17;
    p[12] = 10; p[13] = 77; p[14] = 0; p[15] = (uint8_t)src;
    p[16] = 10; p[17] = 77; p[18] = 0; p[19] = (uint8_t)dst;
    p[20] = 0x04; p[21] = 0xd2; /* port 1234 */
    p[22] = 0x16; p[23] = 0x2e; /* port 5678 */
    p[24] = (uint8_t)((total - 20) >> 8);
    p[25] = (uint8_t)(total - 20);
    for (size_t i = 28; i < total; i++) {
        p[i] = (uint8_t)(i * 31 + seed);
    }
    return total;
}

/* ------------------------------------------------------------ callbacks */

static atomic_int log_records;
static atomic_int log_secret_leaks;
static atomic_int log_engine_call_rc = -1;
static meshvpn_engine *_Atomic log_probe_engine;
static char secrets[4][MESHVPN_KEY_BASE64_LEN];
static int n_secrets;

static void on_log(void *userdata, const meshvpn_log_record *record) {
    CHECK(userdata == (void *)&log_records);
    CHECK(record != NULL && record->message != NULL && record->target != NULL);
    CHECK(record->level >= MESHVPN_LOG_ERROR && record->level <= MESHVPN_LOG_TRACE);
    atomic_fetch_add(&log_records, 1);
    for (int i = 0; i < n_secrets; i++) {
        if (contains(record->message, secrets[i])) {
            atomic_fetch_add(&log_secret_leaks, 1);
        }
    }
    /* Engine calls from inside the log callback are refused. */
    meshvpn_engine *e = atomic_load(&log_probe_engine);
    if (e != NULL) {
        uint16_t mtu;
        atomic_store(&log_engine_call_rc, (int)meshvpn_engine_mtu(e, &mtu));
    }
}

struct recv_cb_state {
    atomic_int calls;
    atomic_int free_rc;
    meshvpn_engine *engine;
};

static void on_packets(void *userdata) {
    struct recv_cb_state *s = userdata;
    atomic_fetch_add(&s->calls, 1);
    /* Freeing the engine from its own callback would join this thread. */
    atomic_store(&s->free_rc, (int)meshvpn_engine_free(s->engine));
}

/* ---------------------------------------------------------------- engines */

struct node {
    meshvpn_engine *engine;
    meshvpn_key priv, pub;
    uint16_t port;
};

static void add_peer(struct node *self, const struct node *other, int other_host) {
    char endpoint[32], allowed[32];
    snprintf(endpoint, sizeof endpoint, "127.0.0.1:%u", (unsigned)other->port);
    snprintf(allowed, sizeof allowed, "10.77.0.%d/32", other_host);
    const char *ips[] = {allowed};
    meshvpn_peer_config peer = {
        .public_key = other->pub,
        .preshared_key = NULL,
        .allowed_ips = ips,
        .allowed_ips_len = 1,
        .endpoint = endpoint,
        .persistent_keepalive = 0,
    };
    OK(meshvpn_engine_add_peer(self->engine, &peer));
}

static void test_engine_config_errors(void) {
    meshvpn_key priv, pub, zero;
    OK(meshvpn_key_generate(&priv));
    OK(meshvpn_key_public(&priv, &pub));
    memset(&zero, 0, sizeof zero);
    meshvpn_engine *untouched = BOGUS_ENGINE, *e = untouched;
    const char *good_ips[] = {"10.1.0.0/16"};
    const char *bad_ips[] = {"10.1.0.0/16", "10.2.0.0/99"};
    const char *null_ips[] = {NULL};
    meshvpn_peer_config peer = {.public_key = pub, .allowed_ips = good_ips, .allowed_ips_len = 1};
    meshvpn_config cfg = {.private_key = &priv, .peers = &peer, .peers_len = 0};
    char msg[512];

    CHECK_RC(meshvpn_engine_new(NULL, &e), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_new(&cfg, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_new_wg_quick(NULL, &e), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_new_wg_quick("[Interface]\n", NULL), MESHVPN_NULL_PARAMETER);

    /* Our own key as a peer. */
    cfg.peers_len = 1;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_KEY_OWN);
    /* A low-order key as a peer. */
    peer.public_key = zero;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_KEY_LOW_ORDER);
    OK(meshvpn_key_generate(&peer.public_key));
    /* A bad prefix: the message names it. */
    peer.allowed_ips = bad_ips;
    peer.allowed_ips_len = 2;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_PREFIX_INVALID);
    last_error(msg, sizeof msg);
    CHECK(contains(msg, "peers[0].allowed_ips[1]"));
    /* A NULL string inside a list, NULL list with a length, huge lengths. */
    peer.allowed_ips = null_ips;
    peer.allowed_ips_len = 1;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_NULL_PARAMETER);
    peer.allowed_ips = NULL;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_NULL_PARAMETER);
    peer.allowed_ips = good_ips;
    peer.allowed_ips_len = SIZE_MAX;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_INVALID_ARGUMENT);
    peer.allowed_ips_len = 1;
    cfg.peers_len = SIZE_MAX;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_INVALID_ARGUMENT);
    cfg.peers_len = SIZE_MAX / sizeof(meshvpn_peer_config) + 1;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_INVALID_ARGUMENT);
    cfg.peers_len = 1;
    cfg.addresses = NULL;
    cfg.addresses_len = 3;
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_NULL_PARAMETER);
    cfg.addresses_len = 0;
    /* Bad endpoints. */
    peer.endpoint = "no-port";
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_ENDPOINT_INVALID);
    peer.endpoint = "127.0.0.1:99999";
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_ENDPOINT_INVALID);
    peer.endpoint = "";
    CHECK_RC(meshvpn_engine_new(&cfg, &e), MESHVPN_ENDPOINT_INVALID);
    peer.endpoint = NULL;
    /* Bad wg-quick text: the message names line and key. */
    CHECK_RC(meshvpn_engine_new_wg_quick("[Interface]\nListenPort = 70000\n", &e),
             MESHVPN_CONFIG_INVALID);
    last_error(msg, sizeof msg);
    CHECK(contains(msg, "line 2") && contains(msg, "ListenPort"));
    CHECK_RC(meshvpn_engine_new_wg_quick("[Peer]\nPublicKey = short\n", &e), MESHVPN_CONFIG_INVALID);
    CHECK_RC(meshvpn_engine_new_wg_quick("\xc3\x28", &e), MESHVPN_INVALID_ARGUMENT);
    /* Nothing was written on any failure. */
    CHECK(e == untouched);

    /* An empty configuration is fine: no key, no peers. */
    OK(meshvpn_engine_new_wg_quick("", &e));
    CHECK(e != NULL && e != untouched);
    meshvpn_key k;
    CHECK_RC(meshvpn_engine_public_key(e, &k), MESHVPN_KEY_MISSING);
    OK(meshvpn_engine_set_private_key(e, &priv));
    OK(meshvpn_engine_public_key(e, &k));
    CHECK(memcmp(k.bytes, pub.bytes, MESHVPN_KEY_LEN) == 0);
    CHECK_RC(meshvpn_engine_set_private_key(e, NULL), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_engine_free(e));
}

static void test_peers(struct node *a) {
    meshvpn_key stranger_priv, stranger;
    OK(meshvpn_key_generate(&stranger_priv));
    OK(meshvpn_key_public(&stranger_priv, &stranger));
    size_t n = 0, before = 0;
    OK(meshvpn_engine_peer_keys(a->engine, NULL, 0, &before));
    CHECK(before == 1);

    /* Update without CREATE on an unknown peer; then with it. */
    const char *ips[] = {"10.99.0.0/24"};
    meshvpn_peer_update u = {
        .public_key = stranger,
        .flags = MESHVPN_PEER_UPDATE_KEEPALIVE | MESHVPN_PEER_UPDATE_ENDPOINT,
        .endpoint = "127.0.0.1:9",
        .persistent_keepalive = 0,
        .allowed_ips = ips,
        .allowed_ips_len = 1,
    };
    CHECK_RC(meshvpn_engine_update_peer(a->engine, &u), MESHVPN_NO_SUCH_PEER);
    u.flags |= MESHVPN_PEER_UPDATE_CREATE | MESHVPN_PEER_UPDATE_PRESHARED_KEY;
    OK(meshvpn_engine_update_peer(a->engine, &u));
    OK(meshvpn_engine_peer_keys(a->engine, NULL, 0, &n));
    CHECK(n == before + 1);

    /* Listing: too small, exact. */
    meshvpn_key keys[4];
    memset(keys, 0xee, sizeof keys);
    CHECK_RC(meshvpn_engine_peer_keys(a->engine, keys, 1, &n), MESHVPN_BUFFER_TOO_SMALL);
    CHECK(keys[0].bytes[0] == 0xee);
    OK(meshvpn_engine_peer_keys(a->engine, keys, 4, &n));
    CHECK(n == 2 && memcmp(keys[1].bytes, stranger.bytes, MESHVPN_KEY_LEN) == 0);
    CHECK_RC(meshvpn_engine_peer_keys(a->engine, NULL, 4, &n), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_peer_keys(a->engine, keys, 4, NULL), MESHVPN_NULL_PARAMETER);

    /* Stats of the new peer: endpoint set, nothing sent. */
    meshvpn_peer_stats ps;
    OK(meshvpn_engine_peer_stats(a->engine, &stranger, &ps));
    CHECK(strcmp(ps.endpoint, "127.0.0.1:9") == 0 && ps.tx_packets == 0);
    CHECK(ps.last_handshake_unix_ms == 0 && ps.handshake_rtt_ms == MESHVPN_RTT_UNKNOWN);

    /* The configuration text shows it. */
    size_t needed = 0;
    OK(meshvpn_engine_config_text(a->engine, NULL, 0, &needed));
    char *text = malloc(needed);
    CHECK_RC(meshvpn_engine_config_text(a->engine, text, needed - 1, &n), MESHVPN_BUFFER_TOO_SMALL);
    OK(meshvpn_engine_config_text(a->engine, text, needed, &n));
    CHECK(n + 1 == needed && contains(text, "10.99.0.0/24") && contains(text, "[Peer]"));
    free(text);
    CHECK_RC(meshvpn_engine_config_text(a->engine, NULL, 0, NULL), MESHVPN_NULL_PARAMETER);

    /* Bad updates. */
    u.flags = 1u << 30;
    CHECK_RC(meshvpn_engine_update_peer(a->engine, &u), MESHVPN_INVALID_ARGUMENT);
    u.flags = MESHVPN_PEER_UPDATE_ENDPOINT;
    u.endpoint = NULL;
    CHECK_RC(meshvpn_engine_update_peer(a->engine, &u), MESHVPN_NULL_PARAMETER);
    u.flags = 0;
    u.allowed_ips_len = SIZE_MAX;
    CHECK_RC(meshvpn_engine_update_peer(a->engine, &u), MESHVPN_INVALID_ARGUMENT);
    u.allowed_ips_len = 0;
    u.public_key = a->pub;
    u.flags = MESHVPN_PEER_UPDATE_CREATE;
    CHECK_RC(meshvpn_engine_update_peer(a->engine, &u), MESHVPN_KEY_OWN);
    CHECK_RC(meshvpn_engine_update_peer(a->engine, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_add_peer(a->engine, NULL), MESHVPN_NULL_PARAMETER);

    /* Remove, twice. */
    OK(meshvpn_engine_remove_peer(a->engine, &stranger));
    CHECK_RC(meshvpn_engine_remove_peer(a->engine, &stranger), MESHVPN_NO_SUCH_PEER);
    CHECK_RC(meshvpn_engine_remove_peer(a->engine, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_peer_stats(a->engine, &stranger, &ps), MESHVPN_NO_SUCH_PEER);
    CHECK_RC(meshvpn_engine_peer_stats(a->engine, NULL, &ps), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_peer_stats(a->engine, &a->pub, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_initiate_handshake(a->engine, &stranger), MESHVPN_NO_SUCH_PEER);
    CHECK_RC(meshvpn_engine_initiate_handshake(a->engine, NULL), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_engine_peer_keys(a->engine, NULL, 0, &n));
    CHECK(n == before);
}

/* Receives one batch at `to`, waiting on its eventfd first. */
static size_t recv_via_eventfd(meshvpn_engine *to, meshvpn_packet *bufs, size_t count) {
    int fd = -1;
    OK(meshvpn_engine_recv_fd(to, &fd));
    CHECK(fd >= 0);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int ready = poll(&pfd, 1, 10000);
    CHECK(ready == 1);
    uint64_t counter;
    CHECK(read(fd, &counter, sizeof counter) == (ssize_t)sizeof counter);
    /* Wakeups may be spurious (the previous receive already took the
     * packet that fired it): then nothing waits and the call times out. */
    size_t got = 0;
    meshvpn_result rc = meshvpn_engine_recv_packets(to, bufs, count, 0, &got);
    CHECK(rc == MESHVPN_OK || rc == MESHVPN_TIMEOUT);
    return rc == MESHVPN_OK ? got : 0;
}

static void test_packet_exchange(struct node *a, struct node *b) {
    enum { N = 3, MTU_BUF = 2048 };
    uint8_t out[N][1500], in[N][MTU_BUF];
    size_t sizes[N] = {84, 1400, 600};
    meshvpn_packet send[N], recv[N];
    for (int i = 0; i < N; i++) {
        ipv4_udp(out[i], sizes[i], 1, 2, (uint8_t)i);
        send[i].data = out[i];
        send[i].len = sizes[i];
        send[i].capacity = 0;
        recv[i].data = in[i];
        recv[i].len = 0;
        recv[i].capacity = MTU_BUF;
    }
    uint16_t mtu = 0;
    OK(meshvpn_engine_mtu(b->engine, &mtu));
    CHECK(mtu == 1420);

    /* Before anything was sent: a poll times out, nothing is written. */
    size_t got = 777;
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, recv, N, 0, &got), MESHVPN_TIMEOUT);
    CHECK(got == 777 && recv[0].len == 0);

    /* A -> B, one batch; the first packet waits for the handshake. */
    size_t sent = 0;
    OK(meshvpn_engine_send_packets(a->engine, send, N, &sent));
    CHECK(sent == N);
    size_t total = 0;
    double deadline = now_s() + 15;
    while (total < N && now_s() < deadline) {
        meshvpn_packet *rest = recv + total;
        got = recv_via_eventfd(b->engine, rest, N - total);
        total += got;
    }
    CHECK(total == N);
    /* Packets of one batch may arrive in any order (several workers);
     * each sent packet (all of distinct sizes) arrives once, intact. */
    for (int i = 0; i < N; i++) {
        int found = 0;
        for (int j = 0; j < (int)total; j++) {
            found += recv[j].len == sizes[i] && memcmp(in[j], out[i], sizes[i]) == 0;
        }
        CHECK(found == 1);
    }

    /* B -> A, with a receive callback and a blocking receive. */
    struct recv_cb_state cb = {.calls = 0, .free_rc = -1, .engine = a->engine};
    OK(meshvpn_engine_set_recv_callback(a->engine, on_packets, &cb));
    uint8_t reply[200], reply_in[MTU_BUF];
    ipv4_udp(reply, sizeof reply, 2, 1, 7);
    OK(meshvpn_engine_send_packet(b->engine, reply, sizeof reply));
    meshvpn_packet r = {.data = reply_in, .len = 0, .capacity = sizeof reply_in};
    OK(meshvpn_engine_recv_packets(a->engine, &r, 1, 10000, &got));
    CHECK(got == 1 && r.len == sizeof reply && memcmp(reply, reply_in, sizeof reply) == 0);
    CHECK(atomic_load(&cb.calls) >= 1);
    /* The callback runs on the engine's thread: it may count its call
     * before its free returns. Wait for the result (5 s at most). */
    for (int tries = 0; tries < 500 && atomic_load(&cb.free_rc) == -1; tries++) {
        usleep(10 * 1000);
    }
    CHECK(atomic_load(&cb.free_rc) == MESHVPN_WOULD_DEADLOCK);
    OK(meshvpn_engine_set_recv_callback(a->engine, NULL, NULL));

    /* Counters on both sides. */
    /* A packet is counted just after it is queued for the host: allow
     * the receive thread a moment to finish counting. */
    meshvpn_peer_stats sa, sb;
    uint64_t bytes = sizes[0] + sizes[1] + sizes[2];
    for (int tries = 0; tries < 200; tries++) {
        OK(meshvpn_engine_peer_stats(a->engine, &b->pub, &sa));
        OK(meshvpn_engine_peer_stats(b->engine, &a->pub, &sb));
        if (sb.rx_packets == N && sa.rx_packets == 1) {
            break;
        }
        usleep(10 * 1000);
    }
    CHECK(sa.tx_packets == N && sa.tx_inner_bytes == bytes);
    CHECK(sb.rx_packets == N && sb.rx_inner_bytes == bytes);
    CHECK(sa.rx_packets == 1 && sb.tx_packets == 1);
    CHECK(sa.last_handshake_unix_ms > 0 && sb.last_handshake_unix_ms > 0);
    CHECK(memcmp(sa.public_key.bytes, b->pub.bytes, MESHVPN_KEY_LEN) == 0);
    char expect_endpoint[32];
    snprintf(expect_endpoint, sizeof expect_endpoint, "127.0.0.1:%u", (unsigned)a->port);
    CHECK(strcmp(sb.endpoint, expect_endpoint) == 0);
    CHECK(sa.drops[MESHVPN_DROP_SOURCE_NOT_ALLOWED] == 0);

    /* Bad input to the packet API. */
    CHECK_RC(meshvpn_engine_send_packet(a->engine, NULL, 20), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_send_packet(a->engine, out[0], 0), MESHVPN_PACKET_MALFORMED);
    CHECK_RC(meshvpn_engine_send_packet(a->engine, out[0], 3), MESHVPN_PACKET_MALFORMED);
    CHECK_RC(meshvpn_engine_send_packet(a->engine, out[0], MESHVPN_MAX_PACKET + 1),
             MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_engine_send_packet(a->engine, out[0], SIZE_MAX), MESHVPN_INVALID_ARGUMENT);
    uint8_t noroute[60];
    ipv4_udp(noroute, sizeof noroute, 1, 200, 0);
    CHECK_RC(meshvpn_engine_send_packet(a->engine, noroute, sizeof noroute), MESHVPN_NO_ROUTE);
    meshvpn_stats es;
    OK(meshvpn_engine_stats(a->engine, &es));
    CHECK(es.tx_no_route == 1 && es.tx_malformed == 2);
    CHECK_RC(meshvpn_engine_stats(a->engine, NULL), MESHVPN_NULL_PARAMETER);
    meshvpn_nat_stats ns;
    OK(meshvpn_engine_nat_stats(a->engine, &ns));
    CHECK(ns.candidates_malformed == 0 && ns.candidates_unknown_peer == 0 &&
          ns.relay_ip_changes == 0);
    CHECK_RC(meshvpn_engine_nat_stats(a->engine, NULL), MESHVPN_NULL_PARAMETER);
    {
        char nat[4096];
        size_t nat_len = 0;
        OK(meshvpn_engine_nat_status(a->engine, nat, sizeof nat, &nat_len));
        CHECK(nat_len > 2 && nat[0] == '{' && strstr(nat, "\"candidates\":[") != NULL &&
              strstr(nat, "\"peers\":[") != NULL &&
              /* No relay has told an address yet. */
              strstr(nat, "\"relay_observed\":null") != NULL &&
              strstr(nat, "\"relay_ip_changes\":0") != NULL);
        CHECK_RC(meshvpn_engine_nat_status(a->engine, nat, 1, &nat_len), MESHVPN_BUFFER_TOO_SMALL);
    }

    sent = 555;
    CHECK_RC(meshvpn_engine_send_packets(a->engine, NULL, 2, &sent), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_send_packets(a->engine, send, SIZE_MAX, &sent), MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_engine_send_packets(a->engine, send, MESHVPN_MAX_BATCH + 1, &sent),
             MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_engine_send_packets(a->engine, send, 1, NULL), MESHVPN_NULL_PARAMETER);
    CHECK(sent == 555);
    OK(meshvpn_engine_send_packets(a->engine, NULL, 0, &sent));
    CHECK(sent == 0);
    /* sendmmsg semantics: stops at the first failure, reports the count. */
    meshvpn_packet mixed[3] = {
        {out[0], sizes[0], 0}, {noroute, sizeof noroute, 0}, {out[1], sizes[1], 0}};
    OK(meshvpn_engine_send_packets(a->engine, mixed, 3, &sent));
    CHECK(sent == 1);
    CHECK(meshvpn_last_error() == MESHVPN_NO_ROUTE);
    CHECK_RC(meshvpn_engine_send_packets(a->engine, mixed + 1, 2, &sent), MESHVPN_NO_ROUTE);
    meshvpn_packet nodata = {NULL, 40, 0};
    CHECK_RC(meshvpn_engine_send_packets(a->engine, &nodata, 1, &sent), MESHVPN_NULL_PARAMETER);
    /* Drain what arrived at B from the mixed batch. */
    OK(meshvpn_engine_recv_packets(b->engine, recv, N, 10000, &got));
    CHECK(got == 1 && recv[0].len == sizes[0]);

    got = 888;
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, recv, 0, 0, &got), MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, recv, SIZE_MAX, 0, &got),
             MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, NULL, 1, 0, &got), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, recv, 1, 0, NULL), MESHVPN_NULL_PARAMETER);
    meshvpn_packet tiny = {in[0], 0, 100};
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, &tiny, 1, 0, &got), MESHVPN_BUFFER_TOO_SMALL);
    meshvpn_packet nobuf = {NULL, 0, MTU_BUF};
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, &nobuf, 1, 0, &got), MESHVPN_NULL_PARAMETER);
    double t0 = now_s();
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, recv, 1, 100, &got), MESHVPN_TIMEOUT);
    CHECK(now_s() - t0 >= 0.09);
    CHECK(got == 888 && tiny.len == 0);
    /* An undersized buffer did not lose a packet: send one, then refuse. */
    OK(meshvpn_engine_send_packet(a->engine, out[2], sizes[2]));
    usleep(200 * 1000);
    CHECK_RC(meshvpn_engine_recv_packets(b->engine, &tiny, 1, 0, &got), MESHVPN_BUFFER_TOO_SMALL);
    OK(meshvpn_engine_recv_packets(b->engine, recv, 1, 10000, &got));
    CHECK(got == 1 && recv[0].len == sizes[2]);

    CHECK_RC(meshvpn_engine_recv_fd(b->engine, NULL), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_engine_initiate_handshake(a->engine, &b->pub));
}

struct blocked_recv {
    meshvpn_engine *engine;
    meshvpn_result rc;
    double returned_at;
};

static void *blocked_recv_thread(void *arg) {
    struct blocked_recv *br = arg;
    uint8_t buf[2048];
    meshvpn_packet p = {buf, 0, sizeof buf};
    size_t got;
    br->rc = meshvpn_engine_recv_packets(br->engine, &p, 1, MESHVPN_WAIT_FOREVER, &got);
    br->returned_at = now_s();
    return NULL;
}

static void test_stop_start(struct node *b) {
    bool running = false;
    OK(meshvpn_engine_is_running(b->engine, &running));
    CHECK(running);
    CHECK_RC(meshvpn_engine_is_running(b->engine, NULL), MESHVPN_NULL_PARAMETER);

    /* A receive blocked without deadline is woken by stop. */
    struct blocked_recv br = {.engine = b->engine, .rc = MESHVPN_OK};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, blocked_recv_thread, &br) == 0);
    usleep(200 * 1000);
    double stopped_at = now_s();
    OK(meshvpn_engine_stop(b->engine));
    pthread_join(t, NULL);
    CHECK(br.rc == MESHVPN_ENGINE_STOPPED);
    CHECK(br.returned_at - stopped_at < 2.0);

    OK(meshvpn_engine_is_running(b->engine, &running));
    CHECK(!running);
    OK(meshvpn_engine_stop(b->engine));
    uint16_t port = 0;
    meshvpn_key k;
    CHECK_RC(meshvpn_engine_listen_port(b->engine, &port), MESHVPN_ENGINE_STOPPED);
    CHECK_RC(meshvpn_engine_public_key(b->engine, &k), MESHVPN_ENGINE_STOPPED);
    CHECK_RC(meshvpn_engine_send_packet(b->engine, (const uint8_t *)"x", 1), MESHVPN_ENGINE_STOPPED);

    OK(meshvpn_engine_start(b->engine));
    OK(meshvpn_engine_start(b->engine));
    OK(meshvpn_engine_is_running(b->engine, &running));
    CHECK(running);
    OK(meshvpn_engine_listen_port(b->engine, &port));
    CHECK(port == b->port);
    OK(meshvpn_engine_public_key(b->engine, &k));
    CHECK(memcmp(k.bytes, b->pub.bytes, MESHVPN_KEY_LEN) == 0);
    size_t n = 0;
    OK(meshvpn_engine_peer_keys(b->engine, NULL, 0, &n));
    CHECK(n == 1);
}

/* Every engine function, through a handle that is NULL, freed or made up. */
static void all_engine_calls(meshvpn_engine *e, meshvpn_result expected) {
    meshvpn_key k;
    memset(&k, 7, sizeof k);
    uint16_t u16;
    bool running;
    size_t n;
    char buf[64];
    meshvpn_peer_config peer = {.public_key = k};
    meshvpn_peer_update upd = {.public_key = k};
    meshvpn_stats es;
    meshvpn_peer_stats ps;
    uint8_t pkt[64];
    meshvpn_packet p = {pkt, sizeof pkt, sizeof pkt};
    int fd;
    CHECK_RC(meshvpn_engine_start(e), expected);
    CHECK_RC(meshvpn_engine_stop(e), expected);
    CHECK_RC(meshvpn_engine_is_running(e, &running), expected);
    CHECK_RC(meshvpn_engine_public_key(e, &k), expected);
    CHECK_RC(meshvpn_engine_set_private_key(e, &k), expected);
    CHECK_RC(meshvpn_engine_listen_port(e, &u16), expected);
    CHECK_RC(meshvpn_engine_mtu(e, &u16), expected);
    CHECK_RC(meshvpn_engine_add_peer(e, &peer), expected);
    CHECK_RC(meshvpn_engine_update_peer(e, &upd), expected);
    CHECK_RC(meshvpn_engine_remove_peer(e, &k), expected);
    CHECK_RC(meshvpn_engine_initiate_handshake(e, &k), expected);
    CHECK_RC(meshvpn_engine_peer_keys(e, NULL, 0, &n), expected);
    CHECK_RC(meshvpn_engine_config_text(e, buf, sizeof buf, &n), expected);
    CHECK_RC(meshvpn_engine_stats(e, &es), expected);
    CHECK_RC(meshvpn_engine_peer_stats(e, &k, &ps), expected);
    CHECK_RC(meshvpn_engine_set_buffer_limit(e, 1000), expected);
    CHECK_RC(meshvpn_engine_buffer_limit(e, &n), expected);
    CHECK_RC(meshvpn_engine_set_filter(e, NULL), expected);
    CHECK_RC(meshvpn_engine_send_packet(e, pkt, sizeof pkt), expected);
    CHECK_RC(meshvpn_engine_send_packets(e, &p, 1, &n), expected);
    CHECK_RC(meshvpn_engine_recv_packets(e, &p, 1, 0, &n), expected);
    CHECK_RC(meshvpn_engine_recv_fd(e, &fd), expected);
    CHECK_RC(meshvpn_engine_set_recv_callback(e, NULL, NULL), expected);
}

static void test_handles(void) {
    all_engine_calls(NULL, MESHVPN_NULL_PARAMETER);
    all_engine_calls(BOGUS_ENGINE, MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_engine_free(BOGUS_ENGINE), MESHVPN_INVALID_HANDLE);
    OK(meshvpn_engine_free(NULL));

    meshvpn_engine *e = NULL;
    OK(meshvpn_engine_new_wg_quick("[Interface]\nListenPort = 0\n", &e));
    meshvpn_engine *stale = e;
    OK(meshvpn_engine_free(e));
    /* Double free and use after free are reported, not undefined. */
    CHECK_RC(meshvpn_engine_free(stale), MESHVPN_INVALID_HANDLE);
    all_engine_calls(stale, MESHVPN_INVALID_HANDLE);
    /* A new engine reusing the slot does not revive the stale handle. */
    meshvpn_engine *e2 = NULL;
    OK(meshvpn_engine_new_wg_quick("", &e2));
    CHECK(e2 != stale);
    CHECK_RC(meshvpn_engine_free(stale), MESHVPN_INVALID_HANDLE);
    bool running = false;
    OK(meshvpn_engine_is_running(e2, &running));
    CHECK(running);
    OK(meshvpn_engine_free(e2));
}

static struct node make_node_from_struct(void) {
    struct node n;
    OK(meshvpn_key_generate(&n.priv));
    OK(meshvpn_key_public(&n.priv, &n.pub));
    const char *addrs[] = {"10.77.0.1/24"};
    meshvpn_config cfg = {
        .private_key = &n.priv,
        .listen_port = 0,
        .addresses = addrs,
        .addresses_len = 1,
        .mtu = 0,
        .fwmark = 0,
        .peers = NULL,
        .peers_len = 0,
    };
    n.engine = NULL;
    OK(meshvpn_engine_new(&cfg, &n.engine));
    OK(meshvpn_engine_listen_port(n.engine, &n.port));
    CHECK(n.port != 0);
    CHECK_RC(meshvpn_engine_listen_port(n.engine, NULL), MESHVPN_NULL_PARAMETER);
    return n;
}

/* The second node comes from wg-quick text naming the first as its peer. */
static struct node make_node_from_wg_quick(const struct node *peer) {
    struct node n;
    char priv[MESHVPN_KEY_BASE64_LEN], peer_pub[MESHVPN_KEY_BASE64_LEN], text[1024];
    size_t len;
    OK(meshvpn_key_generate(&n.priv));
    OK(meshvpn_key_public(&n.priv, &n.pub));
    OK(meshvpn_key_to_base64(&n.priv, priv, sizeof priv, &len));
    OK(meshvpn_key_to_base64(&peer->pub, peer_pub, sizeof peer_pub, &len));
    snprintf(text, sizeof text,
             "# node b\n[Interface]\nPrivateKey = %s\nListenPort = 0\nAddress = 10.77.0.2/24\n"
             "DNS = 10.77.0.53\n\n[Peer]\nPublicKey = %s\nAllowedIPs = 10.77.0.1/32\n"
             "Endpoint = 127.0.0.1:%u\n",
             priv, peer_pub, (unsigned)peer->port);
    memcpy(secrets[n_secrets++], priv, sizeof priv);
    n.engine = NULL;
    OK(meshvpn_engine_new_wg_quick(text, &n.engine));
    OK(meshvpn_engine_listen_port(n.engine, &n.port));
    memset(text, 0, sizeof text);
    return n;
}

/* Packets waiting behind a handshake that never completes stop at the
 * buffer ceiling; the rest are refused as dropped and counted in
 * buffer_limit_drops and as sink_full on their peers. */
static void test_buffer_limit(void) {
    struct node n = make_node_from_struct();
    /* Peers that never answer: a bound socket nobody reads. */
    int silent = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sa_len = sizeof sa;
    CHECK(silent >= 0 && bind(silent, (struct sockaddr *)&sa, sizeof sa) == 0);
    CHECK(getsockname(silent, (struct sockaddr *)&sa, &sa_len) == 0);
    struct node peers[4];
    for (int i = 0; i < 4; i++) {
        OK(meshvpn_key_generate(&peers[i].priv));
        OK(meshvpn_key_public(&peers[i].priv, &peers[i].pub));
        peers[i].port = ntohs(sa.sin_port);
        add_peer(&n, &peers[i], 10 + i);
    }
    size_t limit = 0;
    OK(meshvpn_engine_buffer_limit(n.engine, &limit));
    CHECK(limit == MESHVPN_DEFAULT_BUFFER_LIMIT);
    OK(meshvpn_engine_set_buffer_limit(n.engine, 20000));
    OK(meshvpn_engine_buffer_limit(n.engine, &limit));
    CHECK(limit == 20000);
    CHECK_RC(meshvpn_engine_buffer_limit(n.engine, NULL), MESHVPN_NULL_PARAMETER);
    /* The packet filter's text form: a bad rule is refused, a good one and
     * NULL (allow all again) are taken. */
    CHECK_RC(meshvpn_engine_set_filter(n.engine, "in from 10.0.0.1 to 10.0.0.2:99999"),
             MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_engine_set_filter(n.engine, "in from 0.0.0.0/0 to 0.0.0.0/0 # all\nout from 0.0.0.0/0 to 0.0.0.0/0"));
    OK(meshvpn_engine_set_filter(n.engine, NULL));

    uint8_t p[1000];
    int dropped = 0, other = 0;
    for (int i = 0; i < 200; i++) {
        ipv4_udp(p, sizeof p, 1, 10 + i % 4, (uint8_t)i);
        meshvpn_result rc = meshvpn_engine_send_packet(n.engine, p, sizeof p);
        dropped += rc == MESHVPN_PACKET_DROPPED;
        other += rc != MESHVPN_OK && rc != MESHVPN_PACKET_DROPPED;
    }
    CHECK(dropped == 180 && other == 0);
    meshvpn_stats es;
    OK(meshvpn_engine_stats(n.engine, &es));
    CHECK(es.buffer_limit_drops == 180);
    CHECK(es.udp_send_dropped == 0 && es.tx_no_route == 0);
    uint64_t sink_full = 0;
    for (int i = 0; i < 4; i++) {
        meshvpn_peer_stats ps;
        OK(meshvpn_engine_peer_stats(n.engine, &peers[i].pub, &ps));
        sink_full += ps.drops[MESHVPN_DROP_SINK_FULL];
    }
    CHECK(sink_full == 180);
    printf("buffer limit: %d of 200 packets dropped at 20000 bytes\n", dropped);
    OK(meshvpn_engine_free(n.engine));
    close(silent);
}

#include "netstack_tests.inc"

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    test_version();
    test_result_messages();
    test_panic_boundary();
    test_keys();

    /* Logs at the most verbose level from here on; none may hold a secret. */
    CHECK_RC(meshvpn_set_log_callback(on_log, &log_records, 6), MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_set_log_callback(on_log, &log_records, MESHVPN_LOG_TRACE));

    test_engine_config_errors();

    struct node a = make_node_from_struct();
    char a_priv[MESHVPN_KEY_BASE64_LEN];
    size_t len;
    OK(meshvpn_key_to_base64(&a.priv, a_priv, sizeof a_priv, &len));
    memcpy(secrets[n_secrets++], a_priv, sizeof a_priv);
    struct node b = make_node_from_wg_quick(&a);
    add_peer(&a, &b, 2);

    test_peers(&a);
    atomic_store(&log_probe_engine, a.engine);
    test_packet_exchange(&a, &b);
    atomic_store(&log_probe_engine, NULL);
    CHECK(atomic_load(&log_records) > 0);
    CHECK(atomic_load(&log_secret_leaks) == 0);
    CHECK(atomic_load(&log_engine_call_rc) == MESHVPN_WOULD_DEADLOCK);

    test_stop_start(&b);
    test_uapi(&a, &b);
    test_netstack(&a, &b);

    OK(meshvpn_engine_free(a.engine));
    OK(meshvpn_engine_free(b.engine));
    CHECK_RC(meshvpn_engine_free(a.engine), MESHVPN_INVALID_HANDLE);

    test_buffer_limit();
    test_handles();

    OK(meshvpn_set_log_callback(NULL, NULL, MESHVPN_LOG_OFF));
    printf("log records seen: %d\n", atomic_load(&log_records));
    printf("%d passed, %d failed\n", atomic_load(&passed), atomic_load(&failed));
    return failed == 0 ? 0 : 1;
}
