/*
 * The control server's C ABI (meshvpn_control_server_*), exercised from C:
 * the admin operations an embedding server needs (join keys shown once,
 * listed, revoked; a bad policy refused naming its line; policy versions;
 * unknown nodes; bad prefixes), attaching to a tunnel server whose agents
 * still connect on the same port, its own listener, close, and bad input
 * (NULL, undersized buffers, double free, use after free);
 * meshvpn_control_server_serve_conn with a socketpair (bad descriptor,
 * NULLs, a garbage head: their codes, the descriptor closed; a good
 * upgrade answered 101 and ended by close); and nodes joined to it whose
 * events reach C by callback (meshvpn_node_*).
 *
 *   control_test PKI_DIR
 *
 * PKI_DIR is the one ffi/tests/run-c-tests.sh makes for tunnel_test.
 * Registering real nodes is the Go test's job (bindings/go,
 * TestControlServerNode), which runs `meshvpn up`.
 */
#define _GNU_SOURCE
#include <meshvpn.h>

#include "check.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

CHECK_COUNTERS;

#define WAIT_MS 30000

static char *ca_pem, *server_pem, *server_key;
static char dir[] = "/tmp/meshvpn-control-test-XXXXXX";
static char db[512];

static char *slurp(const char *d, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", d, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = calloc(1, (size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        exit(2);
    }
    fclose(f);
    return buf;
}

/* A listing into a fresh buffer, sized with the buffer protocol. */
static char *listing(meshvpn_control_server *s,
                     meshvpn_result (*f)(meshvpn_control_server *, char *, size_t, size_t *)) {
    size_t n = 0;
    OK(f(s, NULL, 0, &n));
    char *buf = calloc(1, n);
    size_t got = 0;
    OK(f(s, buf, n, &got));
    CHECK(got + 1 == n);
    return buf;
}

static size_t count(const char *hay, const char *needle) {
    size_t c = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += strlen(needle)) {
        c++;
    }
    return c;
}

static void test_admin(void) {
    meshvpn_control_server_config c = {.db_path = db, .ipv4_prefix = "100.80.0.0/16"};
    meshvpn_control_server *s = NULL;
    OK(meshvpn_control_server_new(&c, &s));

    /* Too small a buffer: refused before a key is made (it could not be
     * shown again). */
    meshvpn_join_key_options o = {.tags = "tag:k3s, tag:east", .cluster = "k3s-east"};
    char small[16];
    size_t n = 0;
    CHECK_RC(meshvpn_control_server_create_key(s, &o, small, sizeof small, &n),
             MESHVPN_BUFFER_TOO_SMALL);
    char *keys = listing(s, meshvpn_control_server_keys);
    CHECK(strcmp(keys, "[]") == 0);
    free(keys);

    char key[MESHVPN_JOIN_KEY_LEN];
    OK(meshvpn_control_server_create_key(s, &o, key, sizeof key, &n));
    CHECK(n == MESHVPN_JOIN_KEY_LEN - 1 && strlen(key) == n);
    CHECK(strncmp(key, "mvpn-key-", 9) == 0);
    char id[17] = {0};
    memcpy(id, key + 9, 16);
    keys = listing(s, meshvpn_control_server_keys);
    CHECK(strstr(keys, id) != NULL);
    CHECK(strstr(keys, "\"state\":\"valid\"") != NULL);
    CHECK(strstr(keys, "\"cluster\":\"k3s-east\"") != NULL);
    CHECK(strstr(keys, "tag:east") != NULL);
    /* The secret is not in any listing. */
    CHECK(strstr(keys, key + 26) == NULL);
    free(keys);
    /* A bad tag names itself; nothing is created. */
    meshvpn_join_key_options bad = {.tags = "k3s"};
    CHECK_RC(meshvpn_control_server_create_key(s, &bad, key, sizeof key, &n),
             MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_control_server_revoke_key(s, id));
    keys = listing(s, meshvpn_control_server_keys);
    CHECK(strstr(keys, "\"state\":\"revoked\"") != NULL);
    CHECK(count(keys, "\"id\"") == 1);
    free(keys);
    CHECK_RC(meshvpn_control_server_revoke_key(s, "0000000000000000"), MESHVPN_CONTROL_NOT_FOUND);

    /* Policy: none is version 0; each set is a new version; a bad one
     * names its line and leaves the stored one. */
    char text[256];
    uint64_t v = 99;
    OK(meshvpn_control_server_get_policy(s, text, sizeof text, &n, &v));
    CHECK(v == 0 && n == 0);
    OK(meshvpn_control_server_set_policy(s, "{\"acls\": []}", &v));
    CHECK(v == 1);
    CHECK_RC(meshvpn_control_server_set_policy(
                 s, "{\n  \"acls\": [\n    {\"action\": \"jump\"}\n  ]\n}", &v),
             MESHVPN_CONTROL_POLICY_INVALID);
    char msg[512];
    last_error(msg, sizeof msg);
    CHECK(strstr(msg, "line 3") != NULL);
    CHECK(strstr(msg, "nothing was stored") != NULL);
    OK(meshvpn_control_server_get_policy(s, text, sizeof text, &n, &v));
    CHECK(v == 1 && strcmp(text, "{\"acls\": []}") == 0);
    OK(meshvpn_control_server_set_policy(s, "{}", NULL));
    OK(meshvpn_control_server_get_policy(s, text, sizeof text, &n, &v));
    CHECK(v == 2);

    /* Nodes and routes: none yet. */
    char *nodes = listing(s, meshvpn_control_server_nodes);
    CHECK(strcmp(nodes, "[]") == 0);
    free(nodes);
    char *routes = listing(s, meshvpn_control_server_routes);
    CHECK(strcmp(routes, "[]") == 0);
    free(routes);
    CHECK_RC(meshvpn_control_server_remove_node(s, "ghost"), MESHVPN_CONTROL_NOT_FOUND);
    CHECK_RC(meshvpn_control_server_approve_route(s, "ghost", "10.42.0.0/99"),
             MESHVPN_PREFIX_INVALID);
    CHECK_RC(meshvpn_control_server_approve_route(s, "ghost", "10.42.0.0/24"),
             MESHVPN_CONTROL_NOT_FOUND);

    /* Close: the handle stays, its calls fail; free twice is refused. */
    OK(meshvpn_control_server_close(s));
    CHECK_RC(meshvpn_control_server_set_policy(s, "{}", NULL), MESHVPN_CLOSED);
    OK(meshvpn_control_server_free(s));
    CHECK_RC(meshvpn_control_server_free(s), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_control_server_keys(s, NULL, 0, &n), MESHVPN_INVALID_HANDLE);
    OK(meshvpn_control_server_free(NULL));

    /* The state outlives the handle: a new server on the same file. */
    OK(meshvpn_control_server_new(&c, &s));
    OK(meshvpn_control_server_get_policy(s, text, sizeof text, &n, &v));
    CHECK(v == 2);
    keys = listing(s, meshvpn_control_server_keys);
    CHECK(strstr(keys, id) != NULL);
    free(keys);
    OK(meshvpn_control_server_free(s));
}

static void test_bad_input(void) {
    meshvpn_control_server *s = NULL;
    meshvpn_control_server_config c = {0};
    CHECK_RC(meshvpn_control_server_new(NULL, &s), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_NULL_PARAMETER);
    c.db_path = db;
    CHECK_RC(meshvpn_control_server_new(&c, NULL), MESHVPN_NULL_PARAMETER);
    c.policy = "{\n\"acls\": 7\n}";
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_CONTROL_POLICY_INVALID);
    c.policy = "{}";
    c.policy_file = "/nonexistent";
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_INVALID_ARGUMENT);
    c.policy = NULL;
    c.policy_file = NULL;
    c.ipv4_prefix = "100.64.0.0/40";
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_PREFIX_INVALID);
    c.ipv4_prefix = NULL;
    c.listen = "127.0.0.1:0";
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_NULL_PARAMETER);
    c.cert_pem = "not a pem";
    c.key_pem = "not a pem";
    CHECK_RC(meshvpn_control_server_new(&c, &s), MESHVPN_TUNNEL_TLS);
    char dbdir[600];
    snprintf(dbdir, sizeof dbdir, "%s/no/such/dir/c.db", dir);
    meshvpn_control_server_config missing = {.db_path = dbdir};
    CHECK_RC(meshvpn_control_server_new(&missing, &s), MESHVPN_CONTROL_STORE);
    CHECK_RC(meshvpn_control_server_attach(NULL, NULL), MESHVPN_NULL_PARAMETER);
}

static const char upgrade_head[] =
    "GET /v1-meshvpn/control HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n";

/* A socketpair whose second end reads with a 10 s limit. */
static void pair(int sv[2]) {
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Reads sv's second end to its end; returns the bytes read (-1: error). */
static long drain(int fd, char *first, size_t first_len) {
    long total = 0;
    char buf[4096];
    for (int i = 0; i < 10000; i++) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
            close(fd);
            return n < 0 ? -1 : total;
        }
        if (first && (size_t)total < first_len) {
            size_t k = (size_t)n < first_len - (size_t)total ? (size_t)n : first_len - (size_t)total;
            memcpy(first + total, buf, k);
        }
        total += n;
    }
    close(fd);
    return -1;
}

static void test_serve_conn(void) {
    char hdb[600];
    snprintf(hdb, sizeof hdb, "%s/hosted.db", dir);
    meshvpn_control_server_config c = {.db_path = hdb};
    meshvpn_control_server *s = NULL;
    OK(meshvpn_control_server_new(&c, &s));
    const uint8_t *head = (const uint8_t *)upgrade_head;
    size_t head_len = strlen(upgrade_head);
    uint8_t exporter[MESHVPN_CONTROL_EXPORTER_LEN] = {0};
    int sv[2];

    /* Refusals: each its code, the descriptor closed without a word. */
    pair(sv);
    CHECK_RC(meshvpn_control_server_serve_conn(NULL, sv[0], head, head_len, "192.0.2.1:1", exporter),
             MESHVPN_NULL_PARAMETER);
    CHECK(drain(sv[1], NULL, 0) == 0);
    pair(sv);
    CHECK_RC(meshvpn_control_server_serve_conn(s, sv[0], head, head_len, "192.0.2.1:1", NULL),
             MESHVPN_NULL_PARAMETER);
    CHECK(drain(sv[1], NULL, 0) == 0);
    pair(sv);
    CHECK_RC(meshvpn_control_server_serve_conn(s, sv[0], head, head_len, "nowhere", exporter),
             MESHVPN_INVALID_ARGUMENT);
    CHECK(drain(sv[1], NULL, 0) == 0);
    pair(sv);
    const char *garbage = "\x01\x02 garbage\r\n\r\n";
    CHECK_RC(meshvpn_control_server_serve_conn(s, sv[0], (const uint8_t *)garbage, strlen(garbage),
                                               "192.0.2.1:1", exporter),
             MESHVPN_TUNNEL_HANDSHAKE);
    CHECK(drain(sv[1], NULL, 0) == 0);
    CHECK_RC(meshvpn_control_server_serve_conn(s, -1, head, head_len, "192.0.2.1:1", exporter),
             MESHVPN_INVALID_ARGUMENT);
    int file = open("/dev/null", 0);
    CHECK_RC(meshvpn_control_server_serve_conn(s, file, head, head_len, "192.0.2.1:1", exporter),
             MESHVPN_INVALID_ARGUMENT);
    CHECK(fcntl(file, F_GETFD) == -1); /* the library closed it */

    /* A good upgrade: 101, then close ends it while it waits for a proof. */
    pair(sv);
    OK(meshvpn_control_server_serve_conn(s, sv[0], head, head_len, "192.0.2.1:1", exporter));
    char first[13] = {0};
    size_t got = 0;
    while (got < 12) {
        ssize_t n = read(sv[1], first + got, 12 - got);
        if (n <= 0) {
            break;
        }
        got += (size_t)n;
    }
    CHECK(strcmp(first, "HTTP/1.1 101") == 0);
    OK(meshvpn_control_server_close(s));
    CHECK(drain(sv[1], NULL, 0) >= 0);
    pair(sv);
    CHECK_RC(meshvpn_control_server_serve_conn(s, sv[0], head, head_len, "192.0.2.1:1", exporter),
             MESHVPN_CLOSED);
    CHECK(drain(sv[1], NULL, 0) == 0);
    OK(meshvpn_control_server_free(s));
}

static void test_same_port_as_the_tunnel(void) {
    meshvpn_control_server_config c = {.db_path = db};
    meshvpn_control_server *cs = NULL;
    OK(meshvpn_control_server_new(&c, &cs));
    meshvpn_tunnel_token tokens[] = {{.token = "tok-1", .client_key = "edge1"}};
    meshvpn_tunnel_server_config tc = {
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .tokens = tokens,
        .tokens_len = 1,
        .relay = true,
    };
    meshvpn_tunnel_server *ts = NULL;
    OK(meshvpn_tunnel_server_new(&tc, &ts));
    /* A control server's handle is not a tunnel server's. */
    CHECK_RC(meshvpn_control_server_attach(cs, (meshvpn_tunnel_server *)cs),
             MESHVPN_INVALID_HANDLE);
    OK(meshvpn_control_server_attach(cs, ts));
    CHECK_RC(meshvpn_control_server_attach(cs, ts), MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_tunnel_server_start(ts));
    /* Running: attaching another is refused. */
    meshvpn_control_server *other = NULL;
    OK(meshvpn_control_server_new(&c, &other));
    CHECK_RC(meshvpn_control_server_attach(other, ts), MESHVPN_INVALID_ARGUMENT);
    OK(meshvpn_control_server_free(other));

    /* An agent still gets its tunnel session on the port. */
    char addr[64], url[128];
    size_t n = 0;
    OK(meshvpn_tunnel_server_local_addr(ts, addr, sizeof addr, &n));
    snprintf(url, sizeof url, "wss://%s", addr);
    meshvpn_tunnel_agent_config ac = {.url = url, .ca_pem = ca_pem, .token = "tok-1"};
    meshvpn_tunnel_agent *a = NULL;
    OK(meshvpn_tunnel_agent_new(&ac, &a));
    OK(meshvpn_tunnel_agent_start(a));
    OK(meshvpn_tunnel_server_wait_session(ts, "edge1", WAIT_MS));
    OK(meshvpn_tunnel_agent_free(a));
    /* Freed in either order. */
    OK(meshvpn_control_server_free(cs));
    OK(meshvpn_tunnel_server_free(ts));
}

static void test_own_listener(void) {
    meshvpn_control_server_config c = {
        .db_path = db,
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .relay = true,
    };
    meshvpn_control_server *s = NULL;
    OK(meshvpn_control_server_new(&c, &s));
    char addr[64];
    size_t n = 0;
    CHECK_RC(meshvpn_control_server_local_addr(s, addr, 4, &n), MESHVPN_BUFFER_TOO_SMALL);
    OK(meshvpn_control_server_local_addr(s, addr, sizeof addr, &n));
    CHECK(strncmp(addr, "127.0.0.1:", 10) == 0 && atoi(addr + 10) > 0);
    OK(meshvpn_control_server_free(s));

    meshvpn_control_server_config no_listen = {.db_path = db};
    OK(meshvpn_control_server_new(&no_listen, &s));
    CHECK_RC(meshvpn_control_server_local_addr(s, addr, sizeof addr, &n),
             MESHVPN_TUNNEL_NOT_RUNNING);
    OK(meshvpn_control_server_free(s));
}

/* What a node's event callback saw: its userdata. */
struct seen {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int calls, running, joined, map_applied, bad_len;
    int slow_ms;
};

static void on_event(void *userdata, const char *json, size_t len) {
    struct seen *s = userdata;
    pthread_mutex_lock(&s->mu);
    s->calls++;
    s->running = 1;
    if (strlen(json) != len || json[0] != '{') {
        s->bad_len++;
    }
    s->joined += strstr(json, "\"type\":\"joined\"") != NULL;
    s->map_applied += strstr(json, "\"type\":\"map_applied\"") != NULL;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    if (s->slow_ms) {
        struct timespec d = {.tv_sec = 0, .tv_nsec = s->slow_ms * 1000000L};
        nanosleep(&d, NULL);
    }
    /* Closing any node from here would wait for this very call. */
    CHECK_RC(meshvpn_node_close(NULL), MESHVPN_WOULD_DEADLOCK);
    pthread_mutex_lock(&s->mu);
    s->running = 0;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
}

/* Waits (bounded) until *field reaches at_least; returns whether it did. */
static int wait_seen(struct seen *s, const int *field, int at_least) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    while (*field < at_least && rc == 0) {
        rc = pthread_cond_timedwait(&s->cond, &s->mu, &deadline);
    }
    int ok = *field >= at_least;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

static int seen_calls(struct seen *s) {
    pthread_mutex_lock(&s->mu);
    int c = s->calls;
    pthread_mutex_unlock(&s->mu);
    return c;
}

static meshvpn_node *join_node(const char *url, const char *key) {
    meshvpn_join_config jc = {.control_url = url, .join_key = key, .ca_pem = ca_pem,
                              .endpoint_ips = "127.0.0.1"};
    meshvpn_node *n = NULL;
    OK(meshvpn_join(&jc, WAIT_MS, NULL, &n));
    return n;
}

static void test_node_event_callback(void) {
    meshvpn_control_server_config c = {
        .db_path = db,
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
    };
    meshvpn_control_server *cs = NULL;
    OK(meshvpn_control_server_new(&c, &cs));
    char addr[64], url[160], key[MESHVPN_JOIN_KEY_LEN];
    size_t n = 0;
    OK(meshvpn_control_server_local_addr(cs, addr, sizeof addr, &n));
    snprintf(url, sizeof url, "wss://%s/v1-meshvpn/control", addr);
    meshvpn_join_key_options o = {.reusable = true};
    OK(meshvpn_control_server_create_key(cs, &o, key, sizeof key, &n));

    struct seen s = {.mu = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};
    meshvpn_node *a = join_node(url, key);
    CHECK_RC(meshvpn_node_set_event_callback(NULL, on_event, &s), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_node_set_event_callback(a, on_event, &s));
    /* Queued before the callback was set, then one after. */
    CHECK(wait_seen(&s, &s.joined, 1));
    meshvpn_node *b = join_node(url, key);
    CHECK(wait_seen(&s, &s.map_applied, 1));

    /* Cleared: b leaving reaches a's queue, not the callback. */
    OK(meshvpn_node_set_event_callback(a, NULL, NULL));
    int calls = seen_calls(&s);
    OK(meshvpn_node_free(b));
    char ev[1024];
    CHECK_RC(meshvpn_node_next_event(a, WAIT_MS, ev, sizeof ev, &n), MESHVPN_OK);
    CHECK(strstr(ev, "\"type\":\"map_applied\"") != NULL);
    CHECK(seen_calls(&s) == calls);

    /* A slow call under way when a is freed: the free waits for it. */
    struct seen slow = {.mu = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER,
                        .slow_ms = 300};
    OK(meshvpn_node_set_event_callback(a, on_event, &slow));
    b = join_node(url, key);
    CHECK(wait_seen(&slow, &slow.running, 1));
    OK(meshvpn_node_free(a));
    pthread_mutex_lock(&slow.mu);
    CHECK(slow.running == 0);
    int after_free = slow.calls;
    pthread_mutex_unlock(&slow.mu);
    CHECK(s.bad_len == 0 && slow.bad_len == 0);
    OK(meshvpn_node_free(b));
    OK(meshvpn_control_server_free(cs));
    CHECK(seen_calls(&slow) == after_free);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PKI_DIR\n", argv[0]);
        return 2;
    }
    ca_pem = slurp(argv[1], "ca.pem");
    server_pem = slurp(argv[1], "server.pem");
    server_key = slurp(argv[1], "server.key");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(db, sizeof db, "%s/control.db", dir);

    test_bad_input();
    test_admin();
    test_same_port_as_the_tunnel();
    test_own_listener();
    test_serve_conn();
    test_node_event_callback();

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "could not remove %s\n", dir);
    }
    free(ca_pem);
    free(server_pem);
    free(server_key);
    printf("control_test: %d passed, %d failed\n", (int)passed, (int)failed);
    return failed ? 1 : 0;
}
