// An unmodified Java application for the tests: default JVM settings (no
// system properties, so sockets are dual-stack AF_INET6 and the JDK's own
// resolver order applies). It resolves a name with InetAddress.getAllByName,
// connects a plain java.net.Socket (5 s timeout) to the FIRST address and
// does one HTTP/1.1 GET. Run inside a gated cgroup, it shows that a JVM,
// whose IPv4 connects go out as v4-mapped AF_INET6 sockets, is gated too.
//
//   javac -d DIR ResolveConnect.java && java -cp DIR ResolveConnect NAME PORT
//
// stdout, one item a line (same format as resolve_connect.c):
//   addr IP (getHostAddress(): IPv6 is printed uncompressed, e.g.
//   2001:db8:0:0:0:0:0:10) / connected IP PORT (Socket.getInetAddress(), the
//   address connected to) / body: then the body bytes verbatim / error: REASON
// Exit 0 on success, 2 if resolution fails, 3 if connect/HTTP fails;
// a 9 s watchdog (plus JVM startup) keeps the whole run under 10 s.
import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashSet;
import java.util.Set;

public class ResolveConnect {
    static volatile int phase = 2;

    static void fail(int code, String reason) {
        System.out.println("error: " + reason);
        System.out.flush();
        Runtime.getRuntime().halt(code);
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: java ResolveConnect NAME PORT");
            System.exit(64);
        }
        String name = args[0];
        int port = Integer.parseInt(args[1]);
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(9_000); // + JVM startup stays under 10 s
            } catch (InterruptedException e) {
                return;
            }
            fail(phase, "timeout");
        });
        watchdog.setDaemon(true);
        watchdog.start();

        InetAddress[] addrs;
        try {
            addrs = InetAddress.getAllByName(name);
        } catch (Exception e) {
            fail(2, "getAllByName: " + e);
            return;
        }
        Set<String> seen = new LinkedHashSet<>();
        for (InetAddress a : addrs) {
            if (seen.add(a.getHostAddress())) System.out.println("addr " + a.getHostAddress());
        }
        System.out.flush();

        phase = 3;
        ByteArrayOutputStream all = new ByteArrayOutputStream();
        try (Socket s = new Socket()) {
            s.connect(new InetSocketAddress(addrs[0], port), 5000);
            s.setSoTimeout(5000);
            System.out.println("connected " + s.getInetAddress().getHostAddress() + " " + s.getPort());
            System.out.flush();
            OutputStream out = s.getOutputStream();
            out.write(("GET / HTTP/1.1\r\nHost: " + name + "\r\nConnection: close\r\n\r\n")
                    .getBytes(StandardCharsets.US_ASCII));
            out.flush();
            InputStream in = s.getInputStream();
            byte[] buf = new byte[8192];
            for (int n; (n = in.read(buf)) > 0; ) all.write(buf, 0, n);
        } catch (Exception e) {
            fail(3, "tcp: " + e);
            return;
        }
        byte[] r = all.toByteArray();
        int end = -1;
        for (int i = 0; i + 3 < r.length; i++) {
            if (r[i] == '\r' && r[i + 1] == '\n' && r[i + 2] == '\r' && r[i + 3] == '\n') {
                end = i + 4;
                break;
            }
        }
        if (end < 0) fail(3, r.length == 0 ? "http: empty response" : "http: no end of headers in response");
        System.out.println("body:");
        System.out.write(r, end, r.length - end);
        System.out.flush();
    }
}
