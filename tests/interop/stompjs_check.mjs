// An unmodified third-party client (@stomp/stompjs over the `ws` package) with a client
// certificate: token from /auth/token, bearer subprotocol, wildcard subscribe, publish, receipt.
// usage: node stompjs_check.mjs CERTS_DIR PORT   (prints what it saw; exit 0 on success)
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';
import fs from 'fs';
import https from 'https';
const dir = process.argv[2], port = process.argv[3];
const tls = { cert: fs.readFileSync(`${dir}/alice.crt`), key: fs.readFileSync(`${dir}/alice.key`), ca: fs.readFileSync(`${dir}/ca.crt`) };
const token = await new Promise((resolve, reject) => {
  const req = https.request({ host: '127.0.0.1', port, path: '/auth/token', method: 'POST', ...tls }, res => {
    let body = ''; res.on('data', d => body += d); res.on('end', () => resolve(JSON.parse(body).access_token));
  });
  req.on('error', reject); req.end();
});
const client = new Client({
  webSocketFactory: () => new WebSocket(`wss://127.0.0.1:${port}/ws`, ['v12.stomp', `bearer.${token}`], tls),
  heartbeatIncoming: 1000, heartbeatOutgoing: 1000, reconnectDelay: 0,
  debug: s => {},
});
client.onConnect = frame => {
  console.log('CONNECTED user-name=' + frame.headers['user-name'] + ' version=' + frame.headers['version'] + ' protocol=' + client.webSocket.protocol);
  client.subscribe('/topic/js.*', msg => {
    console.log('MESSAGE', msg.headers.destination, 'sender=' + msg.headers.sender, JSON.stringify(msg.body));
    client.deactivate().then(() => { console.log('DISCONNECTED'); process.exit(0); });
  }, { receipt: 'sub' });
  client.watchForReceipt('sub', () => client.publish({ destination: '/topic/js.room', body: 'hello from stomp.js', headers: { sender: 'forged' } }));
};
client.onStompError = f => { console.log('ERROR', f.headers.message, f.body); process.exit(1); };
client.activate();
setTimeout(() => { console.log('TIMEOUT'); process.exit(1); }, 8000);
