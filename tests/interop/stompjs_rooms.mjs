// PROTOCOL.md §9-§11 seen by an unmodified third-party client (@stomp/stompjs over `ws`):
// GET /auth/me, a direct message (both copies, `to` and `sender` set by the server), presence
// (snapshot, then join), and a forbidden SUBSCRIBE (ERROR forbidden with its receipt-id, close 1008).
// usage: node stompjs_rooms.mjs CERTS_DIR PORT   (prints what it saw; exit 0 once all was seen)
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';
import fs from 'fs';
import https from 'https';
const dir = process.argv[2], port = process.argv[3];
const tls = name => ({ cert: fs.readFileSync(`${dir}/${name}.crt`), key: fs.readFileSync(`${dir}/${name}.key`), ca: fs.readFileSync(`${dir}/ca.crt`) });
const request = (name, method, path) => new Promise((resolve, reject) => {
  const req = https.request({ host: '127.0.0.1', port, path, method, ...tls(name) }, res => {
    let body = ''; res.on('data', d => body += d); res.on('end', () => resolve(JSON.parse(body)));
  });
  req.on('error', reject); req.end();
});
const connect = async name => {
  const token = (await request(name, 'POST', '/auth/token')).access_token;
  const client = new Client({
    webSocketFactory: () => new WebSocket(`wss://127.0.0.1:${port}/ws`, ['v12.stomp', `bearer.${token}`], tls(name)),
    heartbeatIncoming: 0, heartbeatOutgoing: 0, reconnectDelay: 0, debug: s => {},
  });
  const connected = new Promise(resolve => { client.onConnect = resolve; });
  client.activate();
  await connected;
  return client;
};
const subscribed = (client, destination, onMessage, headers = {}) => new Promise(resolve => {
  const receipt = `r-${destination}`;
  client.watchForReceipt(receipt, resolve);
  client.subscribe(destination, onMessage, { ...headers, receipt });
});
const seen = new Set(['dm-bob', 'dm-alice', 'snapshot', 'join', 'error', 'close']);
const saw = (what, line) => { console.log(line); seen.delete(what); if (seen.size === 0) process.exit(0); };
const show = msg => `${msg.headers.destination} to=${msg.headers.to} sender=${msg.headers.sender} ${JSON.stringify(msg.body)}`;

console.log('ME ' + JSON.stringify(await request('alice', 'GET', '/auth/me')));
const bob = await connect('bob');
await subscribed(bob, '/user/bob', msg => saw('dm-bob', 'DM-BOB ' + show(msg)));
await subscribed(bob, '/presence/lobby', msg => saw(msg.headers.presence, `PRESENCE ${msg.headers.presence} ${msg.body}`));
const alice = await connect('alice');
await subscribed(alice, '/user/alice', msg => saw('dm-alice', 'DM-ALICE ' + show(msg)));
await subscribed(alice, '/topic/lobby', msg => {});
alice.publish({ destination: '/user/bob', body: 'psst', headers: { to: 'mallory', sender: 'mallory' } });
setTimeout(() => {
  bob.onStompError = f => saw('error', `ERROR message=${f.headers.message} receipt-id=${f.headers['receipt-id']}`);
  bob.onWebSocketClose = e => saw('close', `CLOSE ${e.code}`);
  bob.subscribe('/topic/team.alice', msg => {}, { receipt: 'nope' });
}, 300);
setTimeout(() => { console.log('TIMEOUT missing ' + [...seen].join(',')); process.exit(1); }, 8000);
