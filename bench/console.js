// Measures the web console in Chromium (playwright-core) against a server
// the console bench (orchestrator/benches/console.rs) filled: per view, the
// median over ROUNDS loads of the time from navigation to the view drawn
// with its data, and the bytes it transferred; then the live latency, from
// an approval POSTed to the API to the run page showing the gate passed.
//
//   URL=... USER_NAME=... PASSWORD=... [ROUNDS=5] node bench/console.js
'use strict';
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const base = process.env.URL;
const rounds = Number(process.env.ROUNDS || 5);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bench-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: '/usr/bin/chromium', headless: true, viewport: { width: 1360, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const cdp = await ctx.newCDPSession(page);
  await cdp.send('Network.enable');
  let bytes = 0;
  cdp.on('Network.loadingFinished', (e) => { bytes += e.encodedDataLength; });

  // First load: the page, its assets and the dashboard's data.
  bytes = 0;
  let t0 = Date.now();
  await page.goto(base + '/');
  await page.fill('#login-name', process.env.USER_NAME);
  await page.fill('#login-password', process.env.PASSWORD);
  await page.click('#login-submit');
  await page.waitForSelector('#sources tbody tr', { timeout: 60000 });
  const first = { ms: Date.now() - t0, bytes };

  const views = [
    ['protection (100 sources)', '#/', 'dashboard', '#sources tbody tr'],
    ['points of one source (100)', '#/sources/' + (process.env.SOURCE || 'vm-042'), 'sourceView', '#timeline circle.point'],
    ['runbooks (11)', '#/runbooks', 'runbooksView', '#runbooks tbody tr'],
    ['runbook with DAG', '#/runbooks/' + (process.env.RUNBOOK || 'app-3.yaml'), 'runbookView', '#dag g.node'],
    ['runs (newest 200 of 1,000)', '#/runs', 'runsView', '#runs tbody tr'],
    ['drill history (200)', '#/drills', 'drillsView', '#rto-chart circle'],
    ['repository (10,000 points)', '#/repository', 'repositoryView', '#coverage'],
  ];
  const rows = [];
  for (const [name, hash, view, sel] of views) {
    const ms = [], bs = [];
    for (let r = 0; r < rounds; r++) {
      await page.evaluate(() => { location.hash = '#/blank'; });
      await page.waitForSelector('#main .error');
      bytes = 0;
      t0 = Date.now();
      await page.evaluate((h) => { document.body.dataset.view = ''; location.hash = h; }, hash);
      await page.waitForFunction(([v, s]) => document.body.dataset.view === v && document.querySelector(s), [view, sel], { timeout: 60000 });
      // Drawn: wait for the next frame after the DOM is there.
      await page.evaluate(() => new Promise((res) => requestAnimationFrame(() => res())));
      ms.push(Date.now() - t0);
      bs.push(bytes);
    }
    rows.push({ view: name, median_ms: median(ms), max_ms: Math.max(...ms), kb: median(bs) / 1024 });
  }

  // Live: a run waiting at a gate; approve through the API, time until the page shows it.
  const live = [];
  for (let r = 0; r < rounds; r++) {
    const run = await page.evaluate(async () => {
      const me = await (await fetch('/api/me')).json();
      const resp = await fetch('/api/runs', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf_token }, body: JSON.stringify({ path: 'gate.yaml', mode: 'run' }) });
      return (await resp.json()).id;
    });
    await page.evaluate((id) => { location.hash = '#/runs/' + id; }, run);
    await page.waitForSelector('[data-approve="go"]', { timeout: 60000 });
    const start = Date.now();
    await page.evaluate(async (id) => {
      const me = await (await fetch('/api/me')).json();
      await fetch('/api/runs/' + id + '/approve', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf_token }, body: JSON.stringify({ step: 'go' }) });
    }, run);
    await page.waitForSelector('#gantt rect.bar[data-step="go"][data-status="succeeded"]', { timeout: 60000 });
    live.push(Date.now() - start);
  }
  await ctx.close();
  fs.rmSync(dir, { recursive: true, force: true });

  console.log('| view | median ms | max ms | KB transferred |');
  console.log('|---|---:|---:|---:|');
  console.log(`| first load and sign-in (page, assets, dashboard) | ${first.ms} | ${first.ms} | ${(first.bytes / 1024).toFixed(1)} |`);
  for (const r of rows) console.log(`| ${r.view} | ${r.median_ms} | ${r.max_ms} | ${r.kb.toFixed(1)} |`);
  console.log(`| live: approval to page updated | ${median(live)} | ${Math.max(...live)} | |`);
})().catch((e) => { console.error(e); process.exit(1); });
