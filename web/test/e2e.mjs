// Browser test of strata's web page, in Debian's headless chromium:
// sign in, launch a console package, type into its terminal, read the
// answer, pause/resume/kill it from the session list.
//   node test/e2e.mjs BASE_URL TOKEN SCREENSHOT.png
import fs from 'node:fs';
import { launchBrowser } from './browser.mjs';

const [base, token, shot] = process.argv.slice(2);
if (!base || !token || !shot) {
  console.error('usage: node test/e2e.mjs BASE_URL TOKEN SCREENSHOT.png');
  process.exit(2);
}

const browser = await launchBrowser();
const step = (m) => console.log(`e2e: ${m}`);
try {
  const refused = await browser.newPage();
  let page = refused;
  const screen = () => page.evaluate(() => document.querySelector('.xterm-rows')?.textContent ?? '');
  const waitScreen = (text, timeout = 60000) =>
    page.waitForFunction((t) => (document.querySelector('.xterm-rows')?.textContent ?? '').includes(t), text, { timeout });

  step('a wrong token is refused');
  await refused.goto(`${base}/`);
  await refused.fill('#token', 'not-a-token');
  await refused.click('#login button[type=submit]');
  await refused.waitForFunction(() => !document.getElementById('error').hidden, null, { timeout: 10000 });
  await refused.close();

  step('sign in and see the catalog');
  page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(`${base}/#token=${token}`);
  await page.waitForSelector('button[data-launch="python3"]', { timeout: 10000 });

  step('launch python3 and wait for its prompt');
  await page.click('button[data-launch="python3"]');
  await waitScreen('>>>');

  step('type into the terminal and read the answer');
  await page.click('#terminal');
  await page.keyboard.type('print(6*7, "from the browser")');
  await page.keyboard.press('Enter');
  await waitScreen('42 from the browser');
  await page.screenshot({ path: shot });

  step('the session list shows its OS and what it uses, pushed by the server');
  await page.waitForFunction(() => {
    const r = document.querySelector('#sessions tr[data-session]');
    return r && r.textContent.includes('debian-12') && /\d+ MiB/.test(r.textContent) && /\d+%/.test(r.textContent);
  }, null, { timeout: 20000 });

  step('upload a file into the session and download it again');
  const bytes = Buffer.from(Array.from({ length: 70000 }, (_, i) => (i * 7 + (i >> 8)) % 256));
  await page.setInputFiles('#file-pick', { name: 'blob.bin', mimeType: 'application/octet-stream', buffer: bytes });
  await page.fill('#file-path', '/root/');
  await page.click('#file-upload');
  await page.waitForFunction(() => document.getElementById('term-status').textContent.startsWith('Uploaded'), null, { timeout: 30000 });
  if ((await page.inputValue('#file-path')) !== '/root/blob.bin') throw new Error('the upload did not name its file');
  const [download] = await Promise.all([page.waitForEvent('download', { timeout: 30000 }), page.click('#file-download')]);
  const got = fs.readFileSync(await download.path());
  if (!got.equals(bytes)) throw new Error(`the download differs: ${got.length} bytes, not ${bytes.length}`);
  await page.fill('#file-path', 'relative/path');
  await page.click('#file-download');
  await page.waitForFunction(() => !document.getElementById('work-error').hidden, null, { timeout: 10000 });

  step('search finds a package by a word of its description');
  await page.fill('#search-q', 'arbitrary precision');
  await page.press('#search-q', 'Enter');
  await page.waitForSelector('#found li[data-found="bc"] button[data-launch-found="bc"]', { timeout: 30000 });
  // With the keyboard alone: Tab from the search reaches the results' buttons.
  await page.focus('#search-q');
  let focused = null;
  for (let i = 0; i < 4 && focused !== 'BUTTON'; i++) {
    await page.keyboard.press('Tab');
    focused = await page.evaluate(() => document.activeElement.closest('#found') !== null && document.activeElement.tagName);
  }
  if (focused !== 'BUTTON') throw new Error(`Tab from the search did not reach a result's button (${focused})`);

  step('the terminal grows with the window');
  const small = await page.locator('#terminal').boundingBox();
  await page.setViewportSize({ width: 1500, height: 1000 });
  await page.waitForTimeout(300);
  const big = await page.locator('#terminal').boundingBox();
  if (!(big.width > small.width && big.height > small.height)) {
    throw new Error(`the terminal did not grow: ${JSON.stringify(small)} -> ${JSON.stringify(big)}`);
  }

  step('the session is listed; pause, resume, kill');
  const row = page.locator('#sessions tr[data-session]').first();
  await row.waitFor({ timeout: 10000 });
  const id = await row.getAttribute('data-session');
  await page.click(`button[data-pause="${id}"]`);
  await page.waitForSelector(`button[data-resume="${id}"]`, { timeout: 10000 });
  await page.click(`button[data-resume="${id}"]`);
  await page.waitForSelector(`button[data-pause="${id}"]`, { timeout: 10000 });
  await page.click('#terminal');
  await page.keyboard.type('print("after", 6*7)');
  await page.keyboard.press('Enter');
  await waitScreen('after 42');
  await page.click(`button[data-kill="${id}"]`);
  await page.waitForFunction((i) => !document.querySelector(`tr[data-session="${i}"]`), id, { timeout: 10000 });

  step('choose Debian 13 and launch python3 on it');
  await page.selectOption('#os', 'debian-13');
  await page.click('button[data-launch="python3"]');
  await page.waitForFunction(() => {
    const r = document.querySelector('#sessions tr[data-session]');
    return r && r.textContent.includes('debian-13');
  }, null, { timeout: 120000 });
  await waitScreen('>>>');
  await page.click('#terminal');
  await page.keyboard.type('print("release", open("/etc/debian_version").read().strip())');
  await page.keyboard.press('Enter');
  await waitScreen('release 13.');
  const other = await page.locator('#sessions tr[data-session]').first().getAttribute('data-session');
  await page.click(`button[data-kill="${other}"]`);
  await page.waitForFunction((i) => !document.querySelector(`tr[data-session="${i}"]`), other, { timeout: 10000 });
  step(`ok (screen: ${JSON.stringify((await screen()).slice(0, 80))}...)`);
} finally {
  await browser.close();
}
