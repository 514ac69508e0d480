// The viewer address `strata run` prints for a graphical package: it shows
// that session's display (not blank) without signing in.
//   node test/viewer.mjs VIEWER_URL SCREENSHOT.png
import { chromium } from 'playwright-core';

const [url, shot] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: node test/viewer.mjs VIEWER_URL SCREENSHOT.png');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => {
    const c = document.querySelector('#display canvas');
    if (!c || !c.width) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let lit = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) lit++;
    return lit > 500;
  }, null, { timeout: 60000, polling: 50 });
  if (!(await page.locator('#login').isHidden())) throw new Error('the viewer asked to sign in');
  await page.screenshot({ path: shot });
  console.log('viewer: ok');
} finally {
  await browser.close();
}
