/* An unmodified C application for the tests: it resolves a name with the
 * platform's own getaddrinfo (glibc when built with gcc, musl when built
 * with musl-gcc -static), connects over TCP to the FIRST address returned
 * and does one plain HTTP/1.1 GET. Run inside a gated cgroup, it shows what
 * a stock libc resolver gets from the gateway and where it ends up.
 *
 *   resolve_connect NAME PORT [unspec|inet|inet6]      (default unspec)
 *   resolve_connect --resolve-only NAME [unspec|inet|inet6]
 *
 * stdout, one item a line:
 *   addr IP           every address returned, in order, deduplicated
 *   connected IP PORT the peer as getpeername() reports it
 *   body:             then the response body bytes verbatim (after the first
 *                     \r\n\r\n), nothing appended
 *   error: REASON     on failure
 * Exit 0 on success, 2 if resolution fails, 3 if connect/HTTP fails.
 * alarm(10) bounds the whole run (timeout exits 2 or 3 by phase).
 *
 * Build: gcc -O2 -Wall -Wextra -o resolve_connect resolve_connect.c
 *        musl-gcc -static -O2 -Wall -Wextra -o resolve_connect resolve_connect.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t phase = 2; /* exit code if the alarm fires */

static void on_alarm(int sig)
{
    static const char msg[] = "error: timeout\n";
    (void)sig;
    if (write(STDOUT_FILENO, msg, sizeof msg - 1) < 0) { /* nothing to do */ }
    _exit(phase);
}

static int fail(int code, const char *what, const char *why)
{
    printf("error: %s: %s\n", what, why);
    return code;
}

static const char *ip_of(const struct sockaddr *sa, char *buf, socklen_t len)
{
    const void *a = sa->sa_family == AF_INET6
        ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
        : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
    return inet_ntop(sa->sa_family, a, buf, len) ? buf : "?";
}

static int port_of(const struct sockaddr *sa)
{
    return ntohs(sa->sa_family == AF_INET6 ? ((const struct sockaddr_in6 *)sa)->sin6_port
                                           : ((const struct sockaddr_in *)sa)->sin_port);
}

int main(int argc, char **argv)
{
    int resolve_only = argc > 1 && strcmp(argv[1], "--resolve-only") == 0;
    const char *name, *port = NULL, *fam;
    if (resolve_only && (argc == 3 || argc == 4)) {
        name = argv[2];
        fam = argc == 4 ? argv[3] : "unspec";
    } else if (!resolve_only && (argc == 3 || argc == 4)) {
        name = argv[1];
        port = argv[2];
        fam = argc == 4 ? argv[3] : "unspec";
    } else {
        fprintf(stderr, "usage: %s NAME PORT [unspec|inet|inet6]\n"
                        "       %s --resolve-only NAME [unspec|inet|inet6]\n", argv[0], argv[0]);
        return 64;
    }
    struct addrinfo hints = {0}, *res, *ai;
    if (strcmp(fam, "inet") == 0) hints.ai_family = AF_INET;
    else if (strcmp(fam, "inet6") == 0) hints.ai_family = AF_INET6;
    else if (strcmp(fam, "unspec") == 0) hints.ai_family = AF_UNSPEC;
    else { fprintf(stderr, "bad family %s\n", fam); return 64; }
    hints.ai_socktype = SOCK_STREAM;

    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGALRM, on_alarm);
    alarm(10);

    int rc = getaddrinfo(name, port, &hints, &res);
    if (rc != 0)
        return fail(2, "getaddrinfo", rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
    char seen[64][INET6_ADDRSTRLEN];
    int nseen = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        char buf[INET6_ADDRSTRLEN];
        ip_of(ai->ai_addr, buf, sizeof buf);
        int dup = 0;
        for (int i = 0; i < nseen; i++) dup |= strcmp(seen[i], buf) == 0;
        if (dup) continue;
        if (nseen < 64) strcpy(seen[nseen++], buf);
        printf("addr %s\n", buf);
    }
    if (resolve_only) return 0;

    phase = 3;
    ai = res;
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) return fail(3, "socket", strerror(errno));
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) return fail(3, "connect", strerror(errno));
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0) return fail(3, "getpeername", strerror(errno));
    char pbuf[INET6_ADDRSTRLEN];
    printf("connected %s %d\n", ip_of((struct sockaddr *)&peer, pbuf, sizeof pbuf),
           port_of((struct sockaddr *)&peer));

    char req[1024];
    int n = snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", name);
    if (n < 0 || (size_t)n >= sizeof req) return fail(3, "request", "name too long");
    for (int off = 0; off < n;) {
        ssize_t w = send(fd, req + off, n - off, MSG_NOSIGNAL);
        if (w < 0) return fail(3, "send", strerror(errno));
        off += (int)w;
    }
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len == cap) buf = realloc(buf, cap *= 2);
        if (!buf) return fail(3, "recv", "out of memory");
        ssize_t r = recv(fd, buf + len, cap - len, 0);
        if (r < 0) return fail(3, "recv", strerror(errno));
        if (r == 0) break;
        len += (size_t)r;
    }
    close(fd);
    char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return fail(3, "http", len ? "no end of headers in response" : "empty response");
    printf("body:\n");
    fwrite(end + 4, 1, len - (size_t)(end + 4 - buf), stdout);
    fflush(stdout);
    freeaddrinfo(res);
    return 0;
}
