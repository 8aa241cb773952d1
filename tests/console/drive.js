// Drives the web console in Debian's Chromium (playwright-core, headless) as
// a viewer, an operator and an admin, and prints what each saw and could do
// as one JSON object; tests/tests/console.rs starts the server and asserts
// on it. Screenshots go to $SHOTS.
//
//   URL=http://127.0.0.1:PORT PASSWORD=... SHOTS=dir node drive.js
'use strict';
const { chromium } = require('playwright-core');
const fs = require('fs');
const os = require('os');
const path = require('path');

const base = process.env.URL;
const password = process.env.PASSWORD;
const shots = process.env.SHOTS;
const out = { requests_elsewhere: [], console_errors: [] };

async function browser(viewport) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: viewport || { width: 1360, height: 900 },
    // A zone off UTC by a fraction of an hour: local times must show it.
    timezoneId: 'Asia/Kolkata',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('request', (r) => { if (!r.url().startsWith(base) && !r.url().startsWith('data:')) out.requests_elsewhere.push(r.url()); });
  // Refused requests (401 before signing in, the 403s this test provokes)
  // are logged by Chromium as resource errors; anything else is a fault.
  page.on('console', (m) => { if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) out.console_errors.push(m.text()); });
  page.on('pageerror', (e) => out.console_errors.push(String(e)));
  page.on('dialog', (d) => d.accept());
  return { page, close: async () => { await ctx.close(); fs.rmSync(dir, { recursive: true, force: true }); } };
}

async function login(page, name, pw) {
  await page.goto(base + '/');
  await page.waitForSelector('#login-name');
  await page.fill('#login-name', name);
  await page.fill('#login-password', pw);
  await page.click('#login-submit');
}

async function view(page, hash, name) {
  // The view marks the page when its data is drawn; clear the mark first.
  await page.evaluate((h) => { document.body.dataset.view = ''; location.hash = h; }, hash);
  await page.waitForFunction((n) => document.body.dataset.view === n, name, { timeout: 30000 });
}

const texts = (page, sel) => page.$$eval(sel, (ns) => ns.map((n) => n.textContent.trim()));

async function viewer() {
  const { page, close } = await browser();
  const r = {};
  await login(page, 'vera', 'not her password');
  await page.waitForSelector('.login .error');
  r.wrong_password = (await page.textContent('.login .error')).trim();
  const t0 = Date.now();
  await login(page, 'vera', password);
  await page.waitForSelector('#sources tbody tr');
  r.dashboard_ms = Date.now() - t0;
  r.nav = await texts(page, '#nav a');
  r.sources = await page.$$eval('.source-row', (rows) => rows.map((x) => ({
    source: x.dataset.source,
    gauge: x.querySelector('svg.gauge').dataset.status,
    text: x.textContent,
  })));
  await page.screenshot({ path: path.join(shots, 'viewer-dashboard.png'), fullPage: true });
  await page.click('.source-row[data-source="web"]');
  await page.waitForSelector('#timeline circle.point');
  r.timeline_points = await page.$$eval('#timeline circle.point', (c) => c.length);
  r.timeline_verified = await page.$$eval('#timeline circle.verified', (c) => c.length);
  r.point_detail = (await page.textContent('#point-detail')).trim();
  await page.screenshot({ path: path.join(shots, 'viewer-points.png'), fullPage: true });
  await view(page, '#/runbooks', 'runbooksView');
  r.runbooks = await page.$$eval('#runbooks tbody tr', (rows) => rows.map((x) => x.textContent));
  await view(page, '#/runbooks/broken.yaml', 'runbookView');
  r.broken_diagnostics = await texts(page, '#diagnostics .error');
  r.broken_highlighted = await page.$$eval('#runbook-text div.bad', (ns) => ns.map((n) => n.id));
  await view(page, '#/runbooks/drill.yaml', 'runbookView');
  r.dag_nodes = await page.$$eval('#dag g.node', (ns) => ns.map((n) => n.dataset.step));
  r.start_drill_button = await page.$('#start-drill') !== null;
  await page.click('#preview');
  await page.waitForSelector('#plan .tiles, #plan .error');
  r.plan = (await page.textContent('#plan')).trim();
  await page.screenshot({ path: path.join(shots, 'viewer-runbook.png'), fullPage: true });
  await view(page, '#/repository', 'repositoryView');
  r.repository = (await page.textContent('#main')).trim();
  await page.screenshot({ path: path.join(shots, 'viewer-repository.png'), fullPage: true });
  // The API refuses what the page does not offer.
  r.forced_start = await page.evaluate(async () => {
    const me = await (await fetch('/api/me')).json();
    const resp = await fetch('/api/runs', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': me.csrf_token }, body: JSON.stringify({ path: 'drill.yaml', mode: 'drill' }) });
    return resp.status;
  });
  // Without the CSRF token a session cannot change anything.
  r.no_csrf = await page.evaluate(async () => (await fetch('/api/logout', { method: 'POST' })).status);
  await close();
  return r;
}

async function operator() {
  const { page, close } = await browser();
  const r = {};
  await login(page, 'omar', password);
  await page.waitForSelector('#sources');
  await view(page, '#/runbooks/drill.yaml', 'runbookView');
  await page.click('#start-drill');
  await page.waitForURL(/#\/runs\//);
  r.run = decodeURIComponent(page.url().split('#/runs/')[1]);
  // The gate appears live, pushed by the event stream.
  await page.waitForSelector('[data-approve="go"]', { timeout: 60000 });
  r.gantt_bars_before = await page.$$eval('#gantt rect.bar', (b) => b.map((x) => x.dataset.step + ':' + x.dataset.status));
  await page.screenshot({ path: path.join(shots, 'operator-run-waiting.png'), fullPage: true });
  const t0 = Date.now();
  // A locator: the page is redrawn as events arrive, so find the button anew.
  await page.locator('[data-approve="go"]').click();
  // From the click to the page showing the gate passed.
  await page.waitForSelector('#gantt rect.bar[data-step="go"][data-status="succeeded"]', { timeout: 30000 });
  r.approve_to_shown_ms = Date.now() - t0;
  await page.waitForFunction(() => /succeeded|failed/.test(document.querySelector('#main h1 + p .badge')?.textContent || ''), null, { timeout: 60000 });
  r.status = (await page.textContent('#main h1 + p .badge')).trim();
  r.steps = await page.$$eval('#steps tbody tr', (rows) => rows.map((x) => x.dataset.step + ':' + x.querySelector('.badge').textContent));
  r.gantt_bars = await page.$$eval('#gantt rect.bar', (b) => b.map((x) => x.dataset.step + ':' + x.dataset.status));
  r.export_links = await page.$$eval('a[href*="/report"]', (a) => a.map((x) => x.getAttribute('href')));
  await page.screenshot({ path: path.join(shots, 'operator-run-finished.png'), fullPage: true });
  await view(page, '#/drills', 'drillsView');
  await page.waitForSelector('#rto-chart circle.drill-point');
  r.drill_points = await page.$$eval('#rto-chart circle.drill-point', (c) => c.length);
  await page.screenshot({ path: path.join(shots, 'operator-drills.png'), fullPage: true });
  r.nav = await texts(page, '#nav a');
  await close();
  return r;
}

async function admin() {
  const { page, close } = await browser();
  const r = {};
  await login(page, 'ada', password);
  await page.waitForSelector('#sources');
  await view(page, '#/users', 'usersView');
  r.users_before = await page.$$eval('#users tbody tr', (rows) => rows.map((x) => x.firstChild.textContent));
  await page.fill('#new-user', 'auditor');
  await page.selectOption('#new-role', 'viewer');
  await page.fill('#new-password', 'a long enough password 42');
  await page.click('#add-user');
  await page.waitForFunction(() => [...document.querySelectorAll('#users tbody tr')].some((x) => x.firstChild.textContent === 'auditor'));
  r.users_after = await page.$$eval('#users tbody tr', (rows) => rows.map((x) => x.firstChild.textContent));
  await page.screenshot({ path: path.join(shots, 'admin-users.png'), fullPage: true });
  // A drill every Sunday, added from the page.
  await view(page, '#/schedules', 'schedulesView');
  await page.fill('#new-schedule', 'weekly');
  await page.fill('#new-cron', '0 3 * * 0');
  await page.selectOption('#new-job', 'drill:drill.yaml');
  await page.click('#add-schedule');
  await page.waitForSelector('tr[data-schedule="weekly"]');
  r.schedule = (await page.textContent('tr[data-schedule="weekly"]')).trim();
  await page.screenshot({ path: path.join(shots, 'admin-schedules.png'), fullPage: true });
  // A machine to enroll: a one-time token made on the page.
  await view(page, '#/agents', 'agentsView');
  r.agents = await page.$$eval('#agents tbody tr', (rows) => rows.map((x) => x.dataset.agent));
  await page.fill('#enroll-source', 'db-2');
  await page.fill('#enroll-device', '/dev/vdb');
  await page.click('#create-enroll-token');
  await page.waitForSelector('#enroll-token pre');
  r.enroll = (await page.textContent('#enroll-token pre')).trim();
  await page.screenshot({ path: path.join(shots, 'admin-agents.png'), fullPage: true });
  await view(page, '#/audit', 'auditView');
  r.audit = await page.$$eval('#audit tbody tr', (rows) => rows.map((x) => [...x.children].map((c) => c.textContent)));
  await page.screenshot({ path: path.join(shots, 'admin-audit.png'), fullPage: true });
  await page.click('#who button');
  await page.waitForSelector('#login-name');
  r.signed_out = true;
  await close();
  return r;
}

// Every page as an admin sees it (an admin sees them all), at 1280 px and
// at 390 px, in light and in dark: what axe-core (WCAG 2 A and AA) finds,
// how far a page scrolls sideways, whether the keyboard alone opens a
// source and a run, and how times read.
async function quality(run) {
  const axe = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
  const pages = [['#/', 'dashboard'], ['#/sources/web', 'sourceView'], ['#/runbooks', 'runbooksView'],
    ['#/runbooks/drill.yaml', 'runbookView'], ['#/runbooks/broken.yaml', 'runbookView'], ['#/runs', 'runsView'],
    ['#/runs/' + run, 'runView'], ['#/drills', 'drillsView'], ['#/schedules', 'schedulesView'], ['#/agents', 'agentsView'],
    ['#/repository', 'repositoryView'], ['#/users', 'usersView'], ['#/audit', 'auditView']];
  const r = { violations: [], overflow: [], pages: pages.length };
  for (const [width, scheme] of [[1280, 'light'], [1280, 'dark'], [390, 'light'], [390, 'dark']]) {
    const { page, close } = await browser({ width, height: 860 });
    await page.emulateMedia({ colorScheme: scheme });
    await login(page, 'ada', password);
    await page.waitForSelector('#sources tbody tr');
    for (const [hash, name] of pages) {
      await view(page, hash, name);
      // Evaluated through the debugging protocol, which the page's CSP
      // does not govern: the console itself never loads a script inline.
      const found = await page.evaluate(async (src) => {
        if (!window.axe) (0, eval)(src);
        const res = await window.axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] }, resultTypes: ['violations'] });
        return res.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' ') + ': ' + n.failureSummary.split('\n').slice(1, 2).join('')) }));
      }, axe);
      for (const v of found) r.violations.push({ page: hash, width, scheme, ...v });
      // How far the page scrolls sideways, and the first element that sticks
      // out of a parent that does not.
      const wide = await page.evaluate(() => {
        const px = document.documentElement.scrollWidth - window.innerWidth;
        if (px <= 0) return null;
        const out = (el) => el.getBoundingClientRect().right > window.innerWidth + 1;
        const all = [...document.querySelectorAll('body *')];
        const el = all.find((e) => out(e) && e.parentElement && !out(e.parentElement)) ||
          all.reduce((a, e) => (!a || e.getBoundingClientRect().right > a.getBoundingClientRect().right ? e : a), null);
        const name = el ? el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.className && typeof el.className === 'string' ? '.' + el.className.split(' ').join('.') : '') : null;
        // Text can stick out of a box that does not.
        const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        let text = null;
        for (let t = walk.nextNode(); t && !text; t = walk.nextNode()) {
          const range = document.createRange();
          range.selectNodeContents(t);
          if (range.getBoundingClientRect().right > window.innerWidth + 1) text = t.parentElement.tagName.toLowerCase() + '.' + t.parentElement.className + ': ' + t.textContent.slice(0, 60);
        }
        return { px, at: name, text };
      });
      if (wide) r.overflow.push({ page: hash, width, scheme, ...wide });
      if (hash === '#/runs/' + run || hash === '#/') {
        await page.screenshot({ path: path.join(shots, `quality-${width}-${scheme}-${name}.png`), fullPage: true });
      }
    }
    if (width === 1280 && scheme === 'light') {
      // The keyboard alone: Tab to the first source row, Enter opens it.
      await view(page, '#/', 'dashboard');
      for (let i = 0; i < 40; i++) {
        await page.keyboard.press('Tab');
        const at = await page.evaluate(() => document.activeElement?.dataset?.source || null);
        if (at) {
          await page.keyboard.press('Enter');
          await page.waitForFunction(() => document.body.dataset.view === 'sourceView', null, { timeout: 10000 });
          break;
        }
      }
      r.keyboard_source = await page.evaluate(() => decodeURIComponent(location.hash.split('#/sources/')[1] || ''));
      await view(page, '#/runs', 'runsView');
      await page.focus('#main tbody tr');
      await page.keyboard.press('Enter');
      await page.waitForFunction(() => document.body.dataset.view === 'runView', null, { timeout: 10000 });
      r.keyboard_run = await page.evaluate(() => decodeURIComponent(location.hash.split('#/runs/')[1] || ''));
      const t = await page.$('#main time');
      r.time_text = t ? (await t.textContent()).trim() : null;
      r.time_title = t ? await t.getAttribute('title') : null;
      r.time_datetime = t ? await t.getAttribute('datetime') : null;
      r.browser_offset_min = await page.evaluate(() => new Date().getTimezoneOffset());
    }
    await close();
  }
  return r;
}

(async () => {
  out.viewer = await viewer();
  out.operator = await operator();
  out.admin = await admin();
  out.quality = await quality(out.operator.run);
  process.stdout.write(JSON.stringify(out) + '\n');
})().catch((e) => {
  process.stdout.write(JSON.stringify({ ...out, error: String(e && e.stack || e) }) + '\n');
  process.exit(1);
});
