/*
 * The supervisor tunnel's C ABI (meshvpn_tunnel_*), exercised from C: a
 * tunnel server and agents over TLS on loopback, the server dialing back
 * through an agent to a small HTTP service this program runs, refusals,
 * timeouts, close waking a blocked read, a server restart the agent
 * survives, and bad input (NULL, bad PEM, undersized buffers, double free,
 * use after free).
 *
 *   tunnel_test PKI_DIR
 *
 * PKI_DIR holds ca.pem, server.pem, server.key, client.pem, client.key
 * (client CN system:node:ctest) and other-ca.pem (an unrelated CA);
 * ffi/tests/run-c-tests.sh makes them with openssl. Built with -Wall
 * -Wextra -Werror and run under valgrind by that script.
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
#include <unistd.h>

CHECK_COUNTERS;

#define NODE_KEY "system:node:ctest"
#define WAIT_MS 30000

static char *ca_pem, *server_pem, *server_key, *client_pem, *client_key, *other_ca_pem;

static char *slurp(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
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

/* ------------------------------------------------ the service behind the agent */

static int service_fd;
static int service_port;
static atomic_int service_stop;

/* Answers each connection's request with a fixed HTTP 200, then closes it. */
static void *service_main(void *arg) {
    (void)arg;
    while (!service_stop) {
        struct pollfd p = {.fd = service_fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) {
            continue;
        }
        int c = accept(service_fd, NULL, NULL);
        if (c < 0) {
            continue;
        }
        char req[4096];
        size_t have = 0;
        while (have < sizeof req - 1) {
            struct pollfd q = {.fd = c, .events = POLLIN};
            if (poll(&q, 1, 100) <= 0) {
                if (service_stop) {
                    break;
                }
                continue;
            }
            ssize_t n = read(c, req + have, sizeof req - 1 - have);
            if (n <= 0) {
                break;
            }
            have += (size_t)n;
            req[have] = 0;
            if (strstr(req, "\r\n\r\n")) {
                const char *resp = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
                if (write(c, resp, strlen(resp)) < 0) {
                    break;
                }
                break;
            }
        }
        close(c);
    }
    return NULL;
}

static pthread_t start_service(void) {
    service_fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(service_fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(service_fd, 16) != 0 ||
        getsockname(service_fd, (struct sockaddr *)&a, &len) != 0) {
        perror("service");
        exit(2);
    }
    service_port = ntohs(a.sin_port);
    pthread_t t;
    pthread_create(&t, NULL, service_main, NULL);
    return t;
}

/* ------------------------------------------------ agent events */

struct events {
    atomic_int connected, disconnected, errors;
    atomic_int last_error_result;
    atomic_int stop_rc; /* what meshvpn_tunnel_agent_stop returned inside the callback */
    meshvpn_tunnel_agent *_Atomic self;
};

static void on_event(void *userdata, const meshvpn_tunnel_event *event) {
    struct events *e = userdata;
    CHECK(event != NULL && event->message != NULL);
    switch (event->kind) {
    case MESHVPN_TUNNEL_EVENT_CONNECTED:
        e->connected++;
        CHECK(event->result == MESHVPN_OK);
        break;
    case MESHVPN_TUNNEL_EVENT_DISCONNECTED:
        e->disconnected++;
        break;
    case MESHVPN_TUNNEL_EVENT_ERROR:
        e->errors++;
        e->last_error_result = (int)event->result;
        break;
    }
    meshvpn_tunnel_agent *self = e->self;
    if (self) {
        e->stop_rc = (int)meshvpn_tunnel_agent_stop(self);
    }
}

static atomic_int allow_calls;

static bool allow_service_only(void *userdata, const char *network, const char *address) {
    (void)userdata;
    allow_calls++;
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%d", service_port);
    return strcmp(network, "tcp") == 0 && strcmp(address, want) == 0;
}

static int wait_for(atomic_int *counter, int at_least, int ms) {
    for (int i = 0; i < ms / 10 && *counter < at_least; i++) {
        usleep(10000);
    }
    return *counter >= at_least;
}

/* ------------------------------------------------ helpers */

/* Runs an agent from `ac` that cannot connect and checks the reason's code. */
static void expect_connect_error(meshvpn_tunnel_agent_config *ac, meshvpn_result want) {
    struct events ev = {0};
    ac->event_callback = on_event;
    ac->event_userdata = &ev;
    meshvpn_tunnel_agent *a = NULL;
    OK(meshvpn_tunnel_agent_new(ac, &a));
    OK(meshvpn_tunnel_agent_start(a));
    CHECK(wait_for(&ev.errors, 1, WAIT_MS));
    CHECK(ev.last_error_result == (int)want);
    CHECK_RC(meshvpn_tunnel_agent_wait_connected(a, 50), MESHVPN_TIMEOUT);
    OK(meshvpn_tunnel_agent_free(a));
}

static meshvpn_tunnel_server *new_server(void) {
    meshvpn_tunnel_token tokens[] = {{.token = "tok-1", .client_key = "edge1"}};
    meshvpn_tunnel_server_config c = {
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .client_ca_pem = ca_pem,
        .tokens = tokens,
        .tokens_len = 1,
    };
    meshvpn_tunnel_server *s = NULL;
    OK(meshvpn_tunnel_server_new(&c, &s));
    OK(meshvpn_tunnel_server_start(s));
    return s;
}

static void server_url(meshvpn_tunnel_server *s, char *url, size_t len) {
    char addr[64];
    size_t n = 0;
    OK(meshvpn_tunnel_server_local_addr(s, addr, sizeof addr, &n));
    snprintf(url, len, "wss://%s", addr);
}

/* Sends an HTTP request through `st` and reads the whole answer into `out`. */
static meshvpn_result http_get(meshvpn_tunnel_stream *st, char *out, size_t cap) {
    const char *req = "GET /kubelet HTTP/1.1\r\nHost: x\r\n\r\n";
    size_t off = 0, n = 0;
    while (off < strlen(req)) {
        meshvpn_result rc = meshvpn_tunnel_stream_write(st, (const uint8_t *)req + off,
                                                        strlen(req) - off, WAIT_MS, &n);
        if (rc != MESHVPN_OK) {
            return rc;
        }
        off += n;
    }
    size_t have = 0;
    for (;;) {
        meshvpn_result rc = meshvpn_tunnel_stream_read(st, (uint8_t *)out + have, cap - 1 - have,
                                                       WAIT_MS, &n);
        if (rc != MESHVPN_OK) {
            return rc;
        }
        if (n == 0) {
            break;
        }
        have += n;
        if (have == cap - 1) {
            break;
        }
    }
    out[have] = 0;
    return MESHVPN_OK;
}

struct closer {
    meshvpn_tunnel_stream *st;
};

static void *close_later(void *arg) {
    struct closer *c = arg;
    usleep(200000);
    meshvpn_tunnel_stream_close(c->st);
    return NULL;
}

static void *interrupt_later(void *arg) {
    struct closer *c = arg;
    usleep(200000);
    meshvpn_tunnel_stream_interrupt(c->st);
    return NULL;
}

/* A loopback port bound but not listening: a dial to it is refused at
 * once. The socket stays open (so nobody else takes the port) until
 * closed by the caller. */
static int refusing_port(int *out_fd) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        perror("refusing_port");
        exit(2);
    }
    *out_fd = fd;
    return ntohs(a.sin_port);
}

/* ------------------------------------------------ tests */

static void test_dial_through_agent(void) {
    meshvpn_tunnel_server *s = new_server();
    char url[128];
    server_url(s, url, sizeof url);

    char allow[64], allow_dead[64], dead[64];
    int dead_fd = -1;
    int dead_port = refusing_port(&dead_fd);
    snprintf(allow, sizeof allow, "tcp/127.0.0.1:%d", service_port);
    snprintf(allow_dead, sizeof allow_dead, "tcp/127.0.0.1:%d", dead_port);
    snprintf(dead, sizeof dead, "127.0.0.1:%d", dead_port);
    const char *patterns[] = {allow, allow_dead};
    struct events ev = {0};
    meshvpn_tunnel_agent_config ac = {
        .url = url,
        .ca_pem = ca_pem,
        .client_cert_pem = client_pem,
        .client_key_pem = client_key,
        .allow = patterns,
        .allow_len = 2,
        .event_callback = on_event,
        .event_userdata = &ev,
    };
    meshvpn_tunnel_agent *a = NULL;
    OK(meshvpn_tunnel_agent_new(&ac, &a));
    CHECK_RC(meshvpn_tunnel_agent_wait_connected(a, 10), MESHVPN_TUNNEL_NOT_RUNNING);
    OK(meshvpn_tunnel_agent_start(a));
    OK(meshvpn_tunnel_agent_start(a)); /* idempotent */
    OK(meshvpn_tunnel_agent_wait_connected(a, WAIT_MS));
    OK(meshvpn_tunnel_server_wait_session(s, NODE_KEY, WAIT_MS));
    CHECK(ev.connected == 1);

    char keys[256];
    size_t n = 0;
    OK(meshvpn_tunnel_server_sessions(s, keys, sizeof keys, &n));
    CHECK(strcmp(keys, NODE_KEY) == 0 && n == strlen(NODE_KEY));
    size_t needed = 0;
    OK(meshvpn_tunnel_server_sessions(s, NULL, 0, &needed));
    CHECK(needed == strlen(NODE_KEY) + 1);
    char small[4] = "xyz";
    CHECK_RC(meshvpn_tunnel_server_sessions(s, small, sizeof small, &n), MESHVPN_BUFFER_TOO_SMALL);
    CHECK(strcmp(small, "xyz") == 0);

    /* Dial back through the agent to the service. */
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", service_port);
    meshvpn_tunnel_stream *st = NULL;
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    char resp[1024];
    OK(http_get(st, resp, sizeof resp));
    CHECK(strstr(resp, "HTTP/1.1 200 OK") != NULL && strstr(resp, "hello") != NULL);
    OK(meshvpn_tunnel_stream_free(st));

    /* The agent counts the request's bytes once its write to the service
     * returns, which may be after the response is already back here. */
    meshvpn_tunnel_agent_status status;
    for (int i = 0; i < WAIT_MS / 10; i++) {
        OK(meshvpn_tunnel_agent_get_status(a, &status));
        if (status.bytes_to_targets > 0) {
            break;
        }
        usleep(10000);
    }
    CHECK(status.connected && status.sessions == 1 && status.reconnects == 0);
    CHECK(status.streams_total == 1);
    CHECK(status.bytes_to_targets > 0 && status.bytes_from_targets > 0);

    /* A target outside the policy: refused on the first read, tunnel stays up. */
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", "127.0.0.1:22", 1000, &st));
    uint8_t buf[64];
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, WAIT_MS, &n), MESHVPN_TUNNEL_REFUSED);
    OK(meshvpn_tunnel_stream_free(st));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.connected && status.streams_refused == 1);
    CHECK(status.dials_failed == 0 && status.streams_refused_at_cap == 0);

    /* An allowed target that refuses the connection: the agent counts a
     * failed dial (before it answers the server), not a stream. */
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", dead, 1000, &st));
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, WAIT_MS, &n), MESHVPN_TUNNEL_REFUSED);
    OK(meshvpn_tunnel_stream_free(st));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.dials_failed == 1 && status.streams_total == 1 && status.streams_refused == 1);
    close(dead_fd);

    /* Nothing to read: the per-call timeout. */
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, 100, &n), MESHVPN_TIMEOUT);
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, 0, &n), MESHVPN_TIMEOUT);
    /* A read blocked without a deadline is woken by an interrupt from
     * another thread, which leaves the stream open; one that comes before
     * the read starts is not lost. */
    struct closer cl = {st};
    pthread_t t;
    pthread_create(&t, NULL, interrupt_later, &cl);
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, MESHVPN_WAIT_FOREVER, &n),
             MESHVPN_INTERRUPTED);
    pthread_join(t, NULL);
    OK(meshvpn_tunnel_stream_interrupt(st));
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, MESHVPN_WAIT_FOREVER, &n),
             MESHVPN_INTERRUPTED);
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, 0, &n), MESHVPN_TIMEOUT);
    /* ... and by close. */
    pthread_create(&t, NULL, close_later, &cl);
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, MESHVPN_WAIT_FOREVER, &n),
             MESHVPN_TUNNEL_CLOSED);
    pthread_join(t, NULL);
    CHECK_RC(meshvpn_tunnel_stream_write(st, buf, 1, 100, &n), MESHVPN_TUNNEL_CLOSED);
    OK(meshvpn_tunnel_stream_close(st)); /* twice */
    OK(meshvpn_tunnel_stream_free(st));
    /* Use after free, double free. */
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, 0, &n), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_stream_free(st), MESHVPN_INVALID_HANDLE);

    /* shutdown_write: the far side sees end of stream, so does this side. */
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    OK(meshvpn_tunnel_stream_shutdown_write(st));
    CHECK_RC(meshvpn_tunnel_stream_write(st, buf, 1, 100, &n), MESHVPN_TUNNEL_CLOSED);
    n = 99;
    OK(meshvpn_tunnel_stream_read(st, buf, sizeof buf, 1000, &n));
    CHECK(n == 0);
    OK(meshvpn_tunnel_stream_free(st));

    /* No session for that client key. */
    CHECK_RC(meshvpn_tunnel_server_dial(s, "nobody", "tcp", target, 0, &st), MESHVPN_TUNNEL_NO_SESSION);
    CHECK_RC(meshvpn_tunnel_server_dial(s, "nobody", "tcp", target, 50, &st), MESHVPN_TUNNEL_NO_SESSION);
    CHECK_RC(meshvpn_tunnel_server_wait_session(s, "nobody", 50), MESHVPN_TUNNEL_NO_SESSION);

    /* The server restarts: a stream over the old session fails, the agent
       reconnects on the same address, new dials work. */
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    OK(meshvpn_tunnel_server_stop(s));
    OK(meshvpn_tunnel_server_stop(s));
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, WAIT_MS, &n), MESHVPN_TUNNEL_RESET);
    OK(meshvpn_tunnel_stream_free(st));
    CHECK_RC(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 0, &st), MESHVPN_TUNNEL_NOT_RUNNING);
    CHECK(wait_for(&ev.disconnected, 1, WAIT_MS));
    OK(meshvpn_tunnel_server_start(s));
    char url2[128];
    server_url(s, url2, sizeof url2);
    CHECK(strcmp(url, url2) == 0);
    OK(meshvpn_tunnel_server_wait_session(s, NODE_KEY, WAIT_MS));
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, WAIT_MS, &st));
    OK(http_get(st, resp, sizeof resp));
    CHECK(strstr(resp, "HTTP/1.1 200 OK") != NULL);
    OK(meshvpn_tunnel_stream_free(st));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.sessions == 2 && status.reconnects == 1);

    /* Stop: the counters stay, and run on after a start. */
    OK(meshvpn_tunnel_agent_stop(a));
    meshvpn_tunnel_agent_status stopped;
    OK(meshvpn_tunnel_agent_get_status(a, &stopped));
    CHECK(!stopped.connected && stopped.sessions == 2 && stopped.dials_failed == 1);
    OK(meshvpn_tunnel_agent_start(a));
    OK(meshvpn_tunnel_agent_wait_connected(a, WAIT_MS));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.connected && status.sessions == 3 && status.reconnects == 2);
    CHECK(status.streams_total == stopped.streams_total && status.dials_failed == 1);
    CHECK(status.bytes_from_targets == stopped.bytes_from_targets);

    /* Stop, then free: no more events. */
    OK(meshvpn_tunnel_agent_stop(a));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(!status.connected);
    OK(meshvpn_tunnel_agent_free(a));
    CHECK_RC(meshvpn_tunnel_agent_start(a), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_agent_free(a), MESHVPN_INVALID_HANDLE);
    OK(meshvpn_tunnel_server_free(s));
    CHECK_RC(meshvpn_tunnel_server_start(s), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_server_free(s), MESHVPN_INVALID_HANDLE);
}

/* An agent limited to one stream: while one is open, the next target is
 * refused and counted as refused at the cap; then new dials work again. */
static void test_agent_stream_cap(void) {
    meshvpn_tunnel_server *s = new_server();
    char url[128], allow[64], target[64];
    server_url(s, url, sizeof url);
    snprintf(allow, sizeof allow, "tcp/127.0.0.1:%d", service_port);
    snprintf(target, sizeof target, "127.0.0.1:%d", service_port);
    const char *patterns[] = {allow};
    meshvpn_tunnel_agent_config ac = {
        .url = url,
        .ca_pem = ca_pem,
        .client_cert_pem = client_pem,
        .client_key_pem = client_key,
        .allow = patterns,
        .allow_len = 1,
        .max_streams = 1,
    };
    meshvpn_tunnel_agent *a = NULL;
    OK(meshvpn_tunnel_agent_new(&ac, &a));
    OK(meshvpn_tunnel_agent_start(a));
    OK(meshvpn_tunnel_server_wait_session(s, NODE_KEY, WAIT_MS));

    /* The first stream holds the only slot (the service waits for its request). */
    meshvpn_tunnel_stream *held = NULL, *st = NULL;
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &held));
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    uint8_t buf[64];
    size_t n = 0;
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, WAIT_MS, &n), MESHVPN_TUNNEL_RESET);
    OK(meshvpn_tunnel_stream_free(st));
    meshvpn_tunnel_agent_status status;
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.streams_refused_at_cap == 1 && status.streams_refused == 0);
    /* (Its dial may still be under way: streams_total is checked below.) */
    CHECK(status.streams_active == 1);

    /* Freed, the slot comes back (once the relay's threads end). */
    OK(meshvpn_tunnel_stream_free(held));
    for (int i = 0; i < WAIT_MS / 10; i++) {
        OK(meshvpn_tunnel_agent_get_status(a, &status));
        if (status.streams_active == 0) {
            break;
        }
        usleep(10000);
    }
    CHECK(status.streams_active == 0);
    OK(meshvpn_tunnel_server_dial(s, NODE_KEY, "tcp", target, 1000, &st));
    char resp[256];
    OK(http_get(st, resp, sizeof resp));
    CHECK(strstr(resp, "hello") != NULL);
    OK(meshvpn_tunnel_stream_free(st));
    OK(meshvpn_tunnel_agent_get_status(a, &status));
    CHECK(status.streams_refused_at_cap == 1 && status.streams_total == 2);
    OK(meshvpn_tunnel_agent_free(a));
    OK(meshvpn_tunnel_server_free(s));
}

static void test_token_callback_and_auth_failures(void) {
    meshvpn_tunnel_server *s = new_server();
    char url[128];
    server_url(s, url, sizeof url);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", service_port);

    /* A token agent whose allow callback decides. */
    struct events ev = {0};
    meshvpn_tunnel_agent_config ac = {
        .url = url,
        .path = "/v1-k3s/connect",
        .ca_pem = ca_pem,
        .token = "tok-1",
        .allow_callback = allow_service_only,
        .event_callback = on_event,
        .event_userdata = &ev,
    };
    meshvpn_tunnel_agent *a = NULL;
    OK(meshvpn_tunnel_agent_new(&ac, &a));
    OK(meshvpn_tunnel_agent_start(a));
    OK(meshvpn_tunnel_server_wait_session(s, "edge1", WAIT_MS));
    meshvpn_tunnel_stream *st = NULL;
    OK(meshvpn_tunnel_server_dial(s, "edge1", "tcp", target, 1000, &st));
    char resp[1024];
    OK(http_get(st, resp, sizeof resp));
    CHECK(strstr(resp, "200 OK") != NULL);
    OK(meshvpn_tunnel_stream_free(st));
    OK(meshvpn_tunnel_server_dial(s, "edge1", "tcp", "127.0.0.1:10250", 1000, &st));
    uint8_t buf[16];
    size_t n = 0;
    CHECK_RC(meshvpn_tunnel_stream_read(st, buf, sizeof buf, WAIT_MS, &n), MESHVPN_TUNNEL_REFUSED);
    OK(meshvpn_tunnel_stream_free(st));
    CHECK(allow_calls == 2);
    /* Stopping from inside the agent's own callback would deadlock: refused. */
    ev.self = a;
    OK(meshvpn_tunnel_server_stop(s));
    CHECK(wait_for(&ev.disconnected, 1, WAIT_MS));
    CHECK(ev.stop_rc == MESHVPN_WOULD_DEADLOCK);
    ev.self = NULL;
    OK(meshvpn_tunnel_agent_free(a));
    OK(meshvpn_tunnel_server_start(s));

    /* A wrong token: the server answers 401, the agent reports AUTH. */
    ac.token = "wrong";
    ac.allow_callback = NULL;
    expect_connect_error(&ac, MESHVPN_TUNNEL_AUTH);
    /* A CA that did not sign the server's certificate: TLS. */
    ac.token = "tok-1";
    ac.ca_pem = other_ca_pem;
    expect_connect_error(&ac, MESHVPN_TUNNEL_TLS);
    /* A wrong path: the upgrade fails. */
    ac.ca_pem = ca_pem;
    ac.path = "/elsewhere";
    expect_connect_error(&ac, MESHVPN_TUNNEL_HANDSHAKE);

    OK(meshvpn_tunnel_server_free(s));
}

static void test_bad_input(void) {
    meshvpn_tunnel_agent *a = NULL;
    meshvpn_tunnel_server *s = NULL;
    meshvpn_tunnel_stream *st = NULL;
    meshvpn_tunnel_agent_config ac = {.url = "wss://127.0.0.1:1", .ca_pem = ca_pem};
    CHECK_RC(meshvpn_tunnel_agent_new(NULL, &a), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, NULL), MESHVPN_NULL_PARAMETER);
    ac.netstack = (const meshvpn_netstack *)(uintptr_t)0x5eed; /* not a live stack */
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_HANDLE);
    ac.netstack = NULL;
    ac.url = NULL;
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_NULL_PARAMETER);
    ac.url = "127.0.0.1:1";
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    ac.url = "wss://127.0.0.1:1";
    ac.ca_pem = NULL;
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    ac.ca_pem = "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_TUNNEL_TLS);
    ac.ca_pem = "no PEM here";
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_TUNNEL_TLS);
    ac.ca_pem = ca_pem;
    ac.client_cert_pem = client_pem; /* without its key */
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    ac.client_key_pem = server_key; /* a key that does not fit the certificate */
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_TUNNEL_TLS);
    ac.client_cert_pem = NULL;
    ac.client_key_pem = NULL;
    const char *bad_patterns[] = {"tcp/1.2.3.4"};
    ac.allow = bad_patterns;
    ac.allow_len = 1;
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    ac.allow = NULL; /* NULL with a length */
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_NULL_PARAMETER);
    ac.allow_len = SIZE_MAX;
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    const char *good_patterns[] = {"tcp/127.0.0.1:*"};
    ac.allow = good_patterns;
    ac.allow_len = 1;
    ac.allow_callback = allow_service_only; /* both */
    CHECK_RC(meshvpn_tunnel_agent_new(&ac, &a), MESHVPN_INVALID_ARGUMENT);
    ac.allow_callback = NULL;
    CHECK(a == NULL); /* outputs untouched on failure */

    meshvpn_tunnel_server_config sc = {
        .listen = "127.0.0.1:0", .cert_pem = server_pem, .key_pem = server_key};
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT); /* no auth */
    sc.client_ca_pem = ca_pem;
    sc.listen = "nowhere";
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.listen = "127.0.0.1:0";
    sc.key_pem = "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n";
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_TUNNEL_TLS);
    sc.key_pem = client_key; /* another certificate's key */
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_TUNNEL_TLS);
    sc.key_pem = NULL;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_NULL_PARAMETER);
    sc.key_pem = server_key;
    meshvpn_tunnel_token empty[] = {{.token = "", .client_key = "x"}};
    sc.tokens = empty;
    sc.tokens_len = 1;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.tokens = NULL;
    sc.tokens_len = 0;
    CHECK_RC(meshvpn_tunnel_server_new(NULL, &s), MESHVPN_NULL_PARAMETER);
    CHECK(s == NULL);

    /* A valid server, not started; then a port that is taken. */
    OK(meshvpn_tunnel_server_new(&sc, &s));
    char addr[8];
    size_t n = 0;
    CHECK_RC(meshvpn_tunnel_server_local_addr(s, addr, sizeof addr, &n), MESHVPN_TUNNEL_NOT_RUNNING);
    CHECK_RC(meshvpn_tunnel_server_dial(s, "k", "tcp", "127.0.0.1:1", 0, &st), MESHVPN_TUNNEL_NOT_RUNNING);
    OK(meshvpn_tunnel_server_start(s));
    CHECK_RC(meshvpn_tunnel_server_local_addr(s, addr, sizeof addr, &n), MESHVPN_BUFFER_TOO_SMALL);
    CHECK_RC(meshvpn_tunnel_server_local_addr(s, addr, sizeof addr, NULL), MESHVPN_NULL_PARAMETER);
    char full[64];
    OK(meshvpn_tunnel_server_local_addr(s, full, sizeof full, &n));
    meshvpn_tunnel_server_config taken = sc;
    taken.listen = full;
    meshvpn_tunnel_server *s2 = NULL;
    OK(meshvpn_tunnel_server_new(&taken, &s2));
    CHECK_RC(meshvpn_tunnel_server_start(s2), MESHVPN_TUNNEL_LISTEN_FAILED);
    OK(meshvpn_tunnel_server_free(s2));
    CHECK_RC(meshvpn_tunnel_server_dial(s, NULL, "tcp", "127.0.0.1:1", 0, &st), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_server_dial(s, "k", "tcp", "127.0.0.1:1", 0, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_server_dial(s, "k", "", "127.0.0.1:1", 0, &st), MESHVPN_INVALID_ARGUMENT);
    CHECK_RC(meshvpn_tunnel_server_wait_session(s, NULL, 0), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_tunnel_server_free(s));

    /* Handles nobody issued, handles of another type, NULL. */
    meshvpn_tunnel_stream *bogus = (meshvpn_tunnel_stream *)(uintptr_t)0x1234;
    uint8_t buf[8];
    CHECK_RC(meshvpn_tunnel_stream_read(bogus, buf, sizeof buf, 0, &n), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_stream_write(NULL, buf, sizeof buf, 0, &n), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_stream_close(NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_stream_shutdown_write(bogus), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_stream_interrupt(bogus), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_stream_interrupt(NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_tunnel_agent_start((meshvpn_tunnel_agent *)s), MESHVPN_INVALID_HANDLE);
    meshvpn_tunnel_agent_status status;
    CHECK_RC(meshvpn_tunnel_agent_get_status(NULL, &status), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_tunnel_agent_free(NULL));
    OK(meshvpn_tunnel_server_free(NULL));
    OK(meshvpn_tunnel_stream_free(NULL));

    /* Every tunnel code has a message. */
    for (unsigned code = MESHVPN_TUNNEL_NO_SESSION; code <= MESHVPN_TUNNEL_NOT_RUNNING; code++) {
        char msg[128];
        OK(meshvpn_result_message(code, msg, sizeof msg, &n));
        CHECK(n > 0);
    }
    char relay_msg[128];
    OK(meshvpn_result_message(MESHVPN_RELAY_NOT_RUNNING, relay_msg, sizeof relay_msg, &n));
    CHECK(strstr(relay_msg, "relay") != NULL);
}

/* ------------------------------------------------------------------ relay */

/* An engine whose only peer is `peer`, at a loopback port where nothing
 * listens (UDP to it goes nowhere), with a 1 s keepalive so that it keeps
 * trying to handshake. */
static meshvpn_engine *relay_engine(const meshvpn_key *priv, const meshvpn_key *peer) {
    const char *allowed[] = {"10.99.0.0/24"};
    meshvpn_peer_config pc = {
        .public_key = *peer,
        .allowed_ips = allowed,
        .allowed_ips_len = 1,
        .endpoint = "127.0.0.1:9",
        .persistent_keepalive = 1,
    };
    meshvpn_config cfg = {.private_key = priv, .peers = &pc, .peers_len = 1};
    meshvpn_engine *e = NULL;
    OK(meshvpn_engine_new(&cfg, &e));
    return e;
}

static void test_relay_bad_input(void) {
    meshvpn_key priv, peer_priv, peer;
    OK(meshvpn_key_generate(&priv));
    OK(meshvpn_key_generate(&peer_priv));
    OK(meshvpn_key_public(&peer_priv, &peer));
    meshvpn_engine *e = relay_engine(&priv, &peer);
    meshvpn_relay_config rc = {
        .url = "wss://127.0.0.1:1/v1-meshvpn/relay",
        .ca_pem = (const uint8_t *)ca_pem,
        .ca_pem_len = strlen(ca_pem),
    };
    meshvpn_relay_status st = {.sessions = 77};
    char buf[256];
    size_t n = 0;

    /* NULL everywhere. */
    CHECK_RC(meshvpn_engine_relay_start(e, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_start(NULL, &rc), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_stop(NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_status(e, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_status(NULL, &st), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_last_error(e, buf, sizeof buf, NULL), MESHVPN_NULL_PARAMETER);
    CHECK_RC(meshvpn_engine_relay_wait_connected(NULL, 0), MESHVPN_NULL_PARAMETER);
    meshvpn_relay_config bad = rc;
    bad.url = NULL;
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_NULL_PARAMETER);
    bad = rc;
    bad.ca_pem = NULL;
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_NULL_PARAMETER);

    /* Status before start; stop without a relay does nothing. */
    CHECK_RC(meshvpn_engine_relay_status(e, &st), MESHVPN_RELAY_NOT_RUNNING);
    CHECK(st.sessions == 77); /* outputs untouched on failure */
    CHECK_RC(meshvpn_engine_relay_last_error(e, buf, sizeof buf, &n), MESHVPN_RELAY_NOT_RUNNING);
    CHECK_RC(meshvpn_engine_relay_wait_connected(e, 10), MESHVPN_RELAY_NOT_RUNNING);
    OK(meshvpn_engine_relay_stop(e));

    /* Bad URLs, wss:// without a CA, a CA that is not PEM. */
    bad = rc;
    bad.url = "https://127.0.0.1:1/v1-meshvpn/relay";
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_INVALID_ARGUMENT);
    bad.url = "127.0.0.1:1";
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_INVALID_ARGUMENT);
    bad = rc;
    bad.ca_pem = NULL;
    bad.ca_pem_len = 0;
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_INVALID_ARGUMENT);
    last_error(buf, sizeof buf);
    CHECK(strstr(buf, "ca_pem") != NULL);
    bad = rc;
    bad.ca_pem = (const uint8_t *)"not a certificate";
    bad.ca_pem_len = strlen("not a certificate");
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_TUNNEL_TLS);
    CHECK_RC(meshvpn_engine_relay_status(e, &st), MESHVPN_RELAY_NOT_RUNNING);

    /* A relay nobody answers: it runs (and keeps retrying); the token never
     * shows in the last error. Start twice replaces; stop twice is fine. */
    rc.token = "secret-relay-token";
    OK(meshvpn_engine_relay_start(e, &rc));
    OK(meshvpn_engine_relay_start(e, &rc));
    OK(meshvpn_engine_relay_status(e, &st));
    CHECK(!st.connected);
    CHECK_RC(meshvpn_engine_relay_wait_connected(e, 50), MESHVPN_TIMEOUT);
    OK(meshvpn_engine_relay_last_error(e, buf, sizeof buf, &n));
    CHECK(strstr(buf, "secret-relay-token") == NULL);
    OK(meshvpn_engine_relay_stop(e));
    OK(meshvpn_engine_relay_stop(e));
    CHECK_RC(meshvpn_engine_relay_status(e, &st), MESHVPN_RELAY_NOT_RUNNING);

    /* A stopped engine, then a stale handle. */
    OK(meshvpn_engine_stop(e));
    CHECK_RC(meshvpn_engine_relay_start(e, &rc), MESHVPN_ENGINE_STOPPED);
    CHECK_RC(meshvpn_engine_relay_status(e, &st), MESHVPN_ENGINE_STOPPED);
    OK(meshvpn_engine_free(e));
    CHECK_RC(meshvpn_engine_relay_start(e, &rc), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_engine_relay_stop(e), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_engine_relay_status(e, &st), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_engine_relay_wait_connected(e, 0), MESHVPN_INVALID_HANDLE);

    /* Server side: relay options without the relay; a relay path without '/'. */
    meshvpn_tunnel_server_config sc = {
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .relay_require_auth = true,
    };
    meshvpn_tunnel_server *s = NULL;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay = true; /* requires auth, but there is no token or client CA */
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay_require_auth = false;
    sc.relay_path = "relay";
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay_path = NULL;
    sc.relay_queue_bytes = 1000; /* below one largest frame */
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay_queue_bytes = 4 << 20; /* over the budget */
    sc.relay_budget_bytes = 1 << 20;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay = false; /* limits without the relay */
    sc.relay_queue_bytes = sc.relay_budget_bytes = 0;
    sc.relay_write_timeout_ms = 1000;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    sc.relay = true;
    sc.relay_write_timeout_ms = 0;
    sc.relay_keys_len = 1; /* keys NULL */
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_NULL_PARAMETER);
    CHECK(s == NULL);
    /* Relay session caps need the relay. */
    sc.relay_keys_len = 0;
    sc.relay = false;
    sc.relay_max_sessions_per_source = 2;
    CHECK_RC(meshvpn_tunnel_server_new(&sc, &s), MESHVPN_INVALID_ARGUMENT);
    CHECK(s == NULL);
    /* A server without the relay has no relay counters; its own counters
     * start at zero. */
    s = new_server();
    meshvpn_relay_server_stats rs;
    CHECK_RC(meshvpn_tunnel_server_relay_stats(s, &rs), MESHVPN_RELAY_NOT_RUNNING);
    CHECK_RC(meshvpn_tunnel_server_relay_stats(s, NULL), MESHVPN_NULL_PARAMETER);
    meshvpn_tunnel_server_stats ss;
    OK(meshvpn_tunnel_server_get_stats(s, &ss));
    CHECK(ss.refused_handshakes == 0 && ss.refused_handshakes_per_source == 0);
    CHECK(ss.relay_sessions == 0 && ss.refused_relay_sessions_per_source == 0);
    CHECK_RC(meshvpn_tunnel_server_get_stats(s, NULL), MESHVPN_NULL_PARAMETER);
    OK(meshvpn_tunnel_server_free(s));
    CHECK_RC(meshvpn_tunnel_server_relay_stats(s, &rs), MESHVPN_INVALID_HANDLE);
    CHECK_RC(meshvpn_tunnel_server_get_stats(s, &ss), MESHVPN_INVALID_HANDLE);
}

/* Two engines whose UDP goes nowhere: through a relay-only server (no
 * tokens; keys restricted to the two engines') they register, and their
 * handshake moves both peers onto the relay. */
static void test_relay_between_engines(void) {
    meshvpn_key priv_a, priv_b, pub[2];
    OK(meshvpn_key_generate(&priv_a));
    OK(meshvpn_key_generate(&priv_b));
    OK(meshvpn_key_public(&priv_a, &pub[0]));
    OK(meshvpn_key_public(&priv_b, &pub[1]));
    meshvpn_tunnel_server_config sc = {
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .relay = true,
        .relay_keys = pub,
        .relay_keys_len = 2,
        .relay_queue_bytes = 256 << 10,
        .relay_budget_bytes = 1 << 20,
        .relay_write_timeout_ms = 5000,
    };
    meshvpn_tunnel_server *s = NULL;
    OK(meshvpn_tunnel_server_new(&sc, &s));
    OK(meshvpn_tunnel_server_start(s));
    char url[128];
    server_url(s, url, sizeof url);
    strncat(url, "/v1-meshvpn/relay", sizeof url - strlen(url) - 1);

    meshvpn_engine *a = relay_engine(&priv_a, &pub[1]);
    meshvpn_engine *b = relay_engine(&priv_b, &pub[0]);
    meshvpn_relay_config rc = {
        .url = url,
        .ca_pem = (const uint8_t *)ca_pem,
        .ca_pem_len = strlen(ca_pem),
        .probe_interval_ms = 60000,
    };
    OK(meshvpn_engine_relay_start(a, &rc));
    OK(meshvpn_engine_relay_start(b, &rc));
    OK(meshvpn_engine_relay_wait_connected(a, WAIT_MS));
    OK(meshvpn_engine_relay_wait_connected(b, WAIT_MS));
    meshvpn_relay_status st;
    OK(meshvpn_engine_relay_status(a, &st));
    CHECK(st.connected && st.sessions == 1);

    /* Two unanswered initiations (about 5 s), then the relay. */
    meshvpn_peer_stats ps = {0};
    for (int i = 0; i < WAIT_MS / 100; i++) {
        OK(meshvpn_engine_peer_stats(a, &pub[1], &ps));
        if (ps.on_relay && ps.last_handshake_unix_ms != 0) break;
        usleep(100 * 1000);
    }
    CHECK(ps.on_relay);
    CHECK(ps.last_handshake_unix_ms != 0);
    CHECK(strncmp(ps.endpoint, "[100::", 6) == 0);
    OK(meshvpn_engine_relay_status(a, &st));
    CHECK(st.frames_sent > 0 && st.frames_received > 0);
    meshvpn_relay_server_stats rs;
    OK(meshvpn_tunnel_server_relay_stats(s, &rs));
    CHECK(rs.clients == 2 && rs.registrations == 2 && rs.forwarded > 0 && rs.refused == 0);
    CHECK(rs.dropped_budget == 0 && rs.closed_slow == 0 && rs.queued_bytes_peak > 0);
    CHECK(rs.session_queued_bytes_peak <= 256 << 10 && rs.queued_bytes_peak <= 1 << 20);

    /* Stopping the relay puts the peer back on its UDP endpoint. */
    OK(meshvpn_engine_relay_stop(a));
    OK(meshvpn_engine_peer_stats(a, &pub[1], &ps));
    CHECK(!ps.on_relay);
    CHECK_RC(meshvpn_engine_relay_status(a, &st), MESHVPN_RELAY_NOT_RUNNING);

    OK(meshvpn_engine_free(a));
    OK(meshvpn_engine_free(b));
    OK(meshvpn_tunnel_server_free(s));
}

/* A relay whose server demands the tunnel's credentials and has only a
 * client CA (no tokens): an engine presents its client certificate through
 * client_cert_pem/client_key_pem and registers; without one it is refused.
 * The fields are checked: both or neither, with ca_pem, in PEM. */
static void test_relay_client_certificate(void) {
    meshvpn_key priv, peer_priv, peer;
    OK(meshvpn_key_generate(&priv));
    OK(meshvpn_key_generate(&peer_priv));
    OK(meshvpn_key_public(&peer_priv, &peer));
    meshvpn_tunnel_server_config sc = {
        .listen = "127.0.0.1:0",
        .cert_pem = server_pem,
        .key_pem = server_key,
        .client_ca_pem = ca_pem,
        .relay = true,
        .relay_require_auth = true,
    };
    meshvpn_tunnel_server *s = NULL;
    OK(meshvpn_tunnel_server_new(&sc, &s));
    OK(meshvpn_tunnel_server_start(s));
    char url[128];
    server_url(s, url, sizeof url);
    strncat(url, "/v1-meshvpn/relay", sizeof url - strlen(url) - 1);
    meshvpn_engine *e = relay_engine(&priv, &peer);
    meshvpn_relay_config rc = {
        .url = url,
        .ca_pem = (const uint8_t *)ca_pem,
        .ca_pem_len = strlen(ca_pem),
    };
    char buf[512];
    size_t n = 0;

    meshvpn_relay_config bad = rc;
    bad.client_cert_pem = (const uint8_t *)client_pem;
    bad.client_cert_pem_len = strlen(client_pem);
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_INVALID_ARGUMENT);
    last_error(buf, sizeof buf);
    CHECK(strstr(buf, "client_key_pem") != NULL);
    bad.client_key_pem = (const uint8_t *)"not a key";
    bad.client_key_pem_len = strlen("not a key");
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_TUNNEL_TLS);
    bad.client_key_pem_len = 1; /* pointer NULL with a length */
    bad.client_key_pem = NULL;
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_NULL_PARAMETER);
    bad.client_key_pem = (const uint8_t *)client_key;
    bad.client_key_pem_len = strlen(client_key);
    bad.ca_pem = NULL;
    bad.ca_pem_len = 0;
    bad.url = "ws://127.0.0.1:1/v1-meshvpn/relay";
    CHECK_RC(meshvpn_engine_relay_start(e, &bad), MESHVPN_INVALID_ARGUMENT);

    /* Without a certificate: refused (401), and told so. */
    OK(meshvpn_engine_relay_start(e, &rc));
    n = 0;
    for (int i = 0; i < WAIT_MS / 100 && n == 0; i++) {
        OK(meshvpn_engine_relay_last_error(e, buf, sizeof buf, &n));
        if (n == 0) usleep(100 * 1000);
    }
    CHECK(strstr(buf, "401") != NULL);
    meshvpn_relay_status st;
    OK(meshvpn_engine_relay_status(e, &st));
    CHECK(!st.connected);

    /* With one: registered. The key never shows in an error. */
    rc.client_cert_pem = (const uint8_t *)client_pem;
    rc.client_cert_pem_len = strlen(client_pem);
    rc.client_key_pem = (const uint8_t *)client_key;
    rc.client_key_pem_len = strlen(client_key);
    OK(meshvpn_engine_relay_start(e, &rc));
    OK(meshvpn_engine_relay_wait_connected(e, WAIT_MS));
    meshvpn_relay_server_stats rs;
    OK(meshvpn_tunnel_server_relay_stats(s, &rs));
    CHECK(rs.clients == 1);
    OK(meshvpn_engine_relay_last_error(e, buf, sizeof buf, &n));
    CHECK(strstr(buf, "PRIVATE KEY") == NULL);

    OK(meshvpn_engine_free(e));
    OK(meshvpn_tunnel_server_free(s));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PKI_DIR\n", argv[0]);
        return 2;
    }
    ca_pem = slurp(argv[1], "ca.pem");
    server_pem = slurp(argv[1], "server.pem");
    server_key = slurp(argv[1], "server.key");
    client_pem = slurp(argv[1], "client.pem");
    client_key = slurp(argv[1], "client.key");
    other_ca_pem = slurp(argv[1], "other-ca.pem");
    pthread_t service = start_service();

    test_bad_input();
    test_dial_through_agent();
    test_agent_stream_cap();
    test_token_callback_and_auth_failures();
    test_relay_bad_input();
    test_relay_between_engines();
    test_relay_client_certificate();

    service_stop = 1;
    pthread_join(service, NULL);
    close(service_fd);
    free(ca_pem);
    free(server_pem);
    free(server_key);
    free(client_pem);
    free(client_key);
    free(other_ca_pem);
    printf("tunnel_test: %d passed, %d failed\n", (int)passed, (int)failed);
    return failed ? 1 : 0;
}
