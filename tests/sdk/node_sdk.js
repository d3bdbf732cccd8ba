// Runs a real npm SDK (@segment/analytics-node or posthog-node, default settings unless a test says
// otherwise) against the sidecar for tests/sdk/: reads a job {sdk, host, calls, options, pace_ms} as
// JSON on stdin, makes each call through the SDK's public API, flushes and shuts it down the way its
// docs say, and prints one JSON line: {errors, statuses, sent}. errors are the SDK's own error events.
'use strict';

const readStdin = async () => {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
};

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function segment(job, report) {
  const { Analytics } = require('@segment/analytics-node');
  const analytics = new Analytics({ writeKey: 'test-write-key', host: job.host, ...job.options });
  analytics.on('error', (err) => report.errors.push(String(err && (err.reason || err.message || err))));
  analytics.on('http_response', (res) => report.statuses.push(res.status));
  for (const c of job.calls) {
    const timestamp = new Date(c.at);
    if (c.kind === 'track') analytics.track({ userId: c.user, event: c.event, timestamp, properties: { n: report.sent } });
    else if (c.kind === 'page') analytics.page({ userId: c.user, name: c.name, timestamp });
    else if (c.kind === 'screen') analytics.screen({ userId: c.user, name: c.name, timestamp });
    else if (c.kind === 'identify') analytics.identify({ userId: c.user, traits: { plan: 'pro' }, timestamp });
    else if (c.kind === 'group') analytics.group({ userId: c.user, groupId: c.target, timestamp });
    else if (c.kind === 'alias') analytics.alias({ userId: c.user, previousId: c.target, timestamp });
    report.sent += 1;
    if (job.pace_ms) await sleep(job.pace_ms);
  }
  await analytics.closeAndFlush({ timeout: 120000 });
}

async function posthog(job, report) {
  const { PostHog } = require('posthog-node');
  const client = new PostHog('phc_test_key', { host: job.host, ...job.options });
  client.on('error', (err) => report.errors.push(String(err && (err.message || err))));
  // posthog-node emits no per-response event: wrap its fetch (the one it would use anyway) to see statuses.
  const fetchOriginal = client.fetch.bind(client);
  client.fetch = async (url, options) => {
    const response = await fetchOriginal(url, options);
    report.statuses.push(response.status);
    return response;
  };
  for (const c of job.calls) {
    const timestamp = new Date(c.at);
    if (c.kind === 'track') client.capture({ distinctId: c.user, event: c.event, timestamp, properties: { n: report.sent } });
    else if (c.kind === 'page') client.capture({ distinctId: c.user, event: '$pageview', timestamp, properties: { $current_url: `https://example.com/${c.name}` } });
    else if (c.kind === 'screen') client.capture({ distinctId: c.user, event: '$screen', timestamp, properties: { $screen_name: c.name } });
    else if (c.kind === 'identify') client.identify({ distinctId: c.user, properties: { plan: 'pro' } });
    else if (c.kind === 'group') client.groupIdentify({ groupType: 'company', groupKey: c.target, properties: { name: c.target }, distinctId: c.user });
    else if (c.kind === 'alias') client.alias({ distinctId: c.user, alias: c.target });
    report.sent += 1;
    if (job.pace_ms) await sleep(job.pace_ms);
  }
  await client.shutdown(120000);
}

(async () => {
  const job = await readStdin();
  const report = { errors: [], statuses: [], sent: 0 };
  const run = { segment, posthog }[job.sdk];
  if (!run) throw new Error(`unknown sdk ${job.sdk}`);
  await run(job, report);
  process.stdout.write(JSON.stringify(report) + '\n');
})().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + '\n');
  process.exit(1);
});
