// The viewer address `strata run` prints for a graphical package: it shows
// that session's display (not blank) without signing in.
//   node test/viewer.mjs VIEWER_URL SCREENSHOT.png
import { launchBrowser } from './browser.mjs';
import { litPixels } from './canvas.mjs';

const [url, shot] = process.argv.slice(2);
if (!url || !shot) {
  console.error('usage: node test/viewer.mjs VIEWER_URL SCREENSHOT.png');
  process.exit(2);
}
const browser = await launchBrowser();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  // No console errors (a missing favicon was one).
  const errors = [];
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(`(${litPixels})() > 500`, null,
    { timeout: Number(process.env.VIEWER_TIMEOUT_MS || 60000), polling: 50 });
  if (!(await page.locator('#login').isHidden())) throw new Error('the viewer asked to sign in');
  // The guest's picture fills the window (scaled, its shape kept).
  const box = await page.locator('#display canvas').boundingBox();
  const share = (box.width * box.height) / (1280 * 900);
  console.log(`viewer: the display covers ${(share * 100).toFixed(0)}% of the window (${box.width}x${box.height})`);
  if (share < 0.8) throw new Error(`the display covers only ${(share * 100).toFixed(0)}% of the window`);
  if (errors.length) throw new Error(`console errors: ${errors.join('; ')}`);
  if (shot !== '/dev/null') await page.screenshot({ path: shot });
  console.log('viewer: ok');
} finally {
  await browser.close();
}
