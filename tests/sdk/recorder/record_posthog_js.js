// Records what the real posthog-js (the browser SDK) sends, as test fixtures for tests/sdk/.
//
// posthog-js runs in jsdom (a browser DOM in Node) against a local recording server that answers the
// SDK's configuration call and records every event request byte for byte. The compression the SDK
// uses is the one the server offers, as PostHog's own /decide/ does (posthog-js <= 1.1xx); current
// releases always gzip. Not part of the test run (posthog-js and jsdom are ~40 MB): run it by hand,
//
//   mkdir /tmp/rec && cd /tmp/rec && npm init -y && npm install posthog-js@1.50.0 jsdom@29 lz-string@1.5.0
//   NODE_PATH=/tmp/rec/node_modules node tests/sdk/recorder/record_posthog_js.js lz64 > tests/sdk/fixtures/posthog-js-1.50.0-lz64.json
//
// (compression: gzip-js | lz64 | base64; the same with posthog-js@1.449.2 records today's encoding).
'use strict';
const http = require('http');
const zlib = require('zlib');
const { JSDOM } = require('jsdom');
const LZString = require('lz-string');

// The events of a request, decoded here with Node's zlib and lz-string (independently of the sidecar):
// the tests expect the sidecar to find exactly these.
function decode(url, headers, body) {
  let text;
  const query = new URL(url, 'http://x').searchParams;
  if (body[0] === 0x1f && body[1] === 0x8b) text = zlib.gunzipSync(body).toString('utf8');
  else if ((headers['content-type'] || '').startsWith('application/x-www-form-urlencoded')) {
    const form = new URLSearchParams(body.toString('latin1'));
    const data = form.get('data');
    const compression = query.get('compression') || form.get('compression');
    text = compression === 'lz64' ? LZString.decompressFromBase64(data) : Buffer.from(data, 'base64').toString('utf8');
  } else text = body.toString('utf8');
  const parsed = JSON.parse(text);
  const events = Array.isArray(parsed) ? parsed : parsed.batch || [parsed];
  return events.map((e) => ({ event: e.event || null,
    distinct_id: e.distinct_id || e.$distinct_id || (e.properties || {}).distinct_id || null,
    uuid: e.uuid || null, timestamp: e.timestamp || null }));
}

const compression = process.argv[2] || 'gzip-js';
const recorded = [];
const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (req.url === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html' });
      return res.end('<html><body></body></html>');
    }
    if (/^\/(decide|flags)/.test(req.url) || req.url.includes('/config')) {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify({
        supportedCompression: compression === 'base64' ? [] : [compression],
        featureFlags: {}, sessionRecording: false,
      }));
    }
    const headers = {};
    for (const name of ['content-type', 'content-encoding']) if (req.headers[name]) headers[name] = req.headers[name];
    recorded.push({ method: req.method, path: req.url, headers, body_base64: body.toString('base64'),
      events: decode(req.url, headers, body) });
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end('{"status":1}');
  });
});

server.listen(0, '127.0.0.1', async () => {
  const host = `http://127.0.0.1:${server.address().port}`;
  const dom = await JSDOM.fromURL(`${host}/`, { runScripts: 'outside-only' });
  for (const name of ['window', 'document', 'navigator', 'XMLHttpRequest', 'location', 'localStorage',
    'sessionStorage', 'screen', 'self', 'Blob']) {
    Object.defineProperty(globalThis, name, { value: dom.window[name], configurable: true, writable: true });
  }
  const posthog = require('posthog-js').default;
  const version = require('posthog-js/package.json').version;
  posthog.init('phc_recorder', { api_host: host, autocapture: false, capture_pageview: false,
    disable_session_recording: true, request_batching: true });
  await new Promise((r) => setTimeout(r, 1000)); // the configuration call answers; compression is chosen
  posthog.capture('signup', { plan: 'pro' });
  posthog.capture('purchase', { amount: 3 });
  posthog.capture('$pageview', { $current_url: 'https://example.com/pricing' });
  posthog.capture('purchase', { amount: 5 });
  posthog.identify('user-1', { email: 'a@example.com' });
  posthog.group('company', 'org-1', { name: 'Org' });
  posthog.people.set({ plan: 'pro' }); // posthog-js <= 1.5x: POST /engage/ (a form, no event name)
  await new Promise((r) => setTimeout(r, 4000)); // the batch queue flushes every 3 s
  process.stdout.write(JSON.stringify({
    client: `posthog-js ${version}`, offered_compression: compression, recorded_at: new Date().toISOString(),
    how: 'tests/sdk/recorder/record_posthog_js.js: posthog-js in jsdom against a local recording server',
    requests: recorded,
  }, null, 1) + '\n');
  server.close();
  process.exit(0);
});
