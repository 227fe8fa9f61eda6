// An unmodified Node.js application for the tests: it resolves a name the
// way Node programs do, connects over TCP to the FIRST address and does one
// plain HTTP/1.1 GET. Run inside a gated cgroup, it shows what Node's two
// resolvers get from the gateway and where the connection ends up.
//
//   node resolve_connect.js lookup NAME PORT    dns.lookup({all: true}) = getaddrinfo
//                                               (libuv threadpool); default options,
//                                               so Node >= 17 keeps getaddrinfo's order
//   node resolve_connect.js resolve4 NAME PORT  dns.resolve4 = c-ares, which
//                                               reads /etc/resolv.conf itself
//
// stdout, one item a line (same format as resolve_connect.c):
//   addr IP / connected IP PORT (remoteAddress, i.e. getpeername) /
//   body: then the body bytes verbatim / error: REASON
// Exit 0 on success, 2 if resolution fails, 3 if connect/HTTP fails;
// a 9 s timer (plus startup) keeps the whole run under 10 s.
'use strict';
const dns = require('dns');
const net = require('net');

const [mode, name, portArg] = process.argv.slice(2);
const port = Number(portArg);
if (!['lookup', 'resolve4'].includes(mode) || !name || !Number.isInteger(port)) {
  process.stderr.write('usage: node resolve_connect.js <lookup|resolve4> NAME PORT\n');
  process.exit(64);
}

let phase = 2;
function fail(code, reason) {
  process.stdout.write(`error: ${reason}\n`, () => process.exit(code));
}
setTimeout(() => fail(phase, 'timeout'), 9000); // + startup stays under 10 s

function resolved(err, addrs) {
  if (err) return fail(2, `${mode}: ${err.code || err.message}`);
  const seen = [];
  for (const a of addrs) if (!seen.includes(a)) seen.push(a);
  if (seen.length === 0) return fail(2, `${mode}: no addresses`);
  process.stdout.write(seen.map((a) => `addr ${a}\n`).join(''));
  phase = 3;
  const chunks = [];
  const sock = net.connect({ host: seen[0], port });
  sock.on('connect', () => {
    process.stdout.write(`connected ${sock.remoteAddress} ${sock.remotePort}\n`);
    sock.write(`GET / HTTP/1.1\r\nHost: ${name}\r\nConnection: close\r\n\r\n`);
  });
  sock.on('data', (d) => chunks.push(d));
  sock.on('error', (e) => fail(3, `tcp: ${e.code || e.message}`));
  sock.on('end', () => {
    const all = Buffer.concat(chunks);
    const i = all.indexOf('\r\n\r\n');
    if (i < 0) return fail(3, all.length ? 'http: no end of headers in response' : 'http: empty response');
    process.stdout.write(Buffer.concat([Buffer.from('body:\n'), all.subarray(i + 4)]), () => process.exit(0));
  });
}

if (mode === 'lookup') {
  dns.lookup(name, { all: true }, (err, list) =>
    resolved(err, list && list.map((x) => x.address)));
} else {
  dns.resolve4(name, resolved);
}
