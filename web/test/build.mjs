// A launch from the page of a package whose images are not built: the
// build's progress appears and grows; then the page is closed mid-build
// (the test checks, through the API, that the build still ends).
//   node test/build.mjs BASE_URL TOKEN PACKAGE
import { launchBrowser } from './browser.mjs';

const [base, token, pkg] = process.argv.slice(2);
if (!base || !token || !pkg) {
  console.error('usage: node test/build.mjs BASE_URL TOKEN PACKAGE');
  process.exit(2);
}
const browser = await launchBrowser();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(`${base}/#token=${token}`);
  await page.click(`button[data-launch="${pkg}"]`, { timeout: 10000 });
  const progress = () => page.evaluate(() => {
    const p = document.getElementById('build-progress');
    return p.hidden ? null : p.value;
  });
  // Seen while the build runs: each distinct figure, in order.
  const seen = [];
  const until = Date.now() + 5 * 60 * 1000;
  while (Date.now() < until) {
    const v = await progress();
    if (v !== null && v !== seen[seen.length - 1]) seen.push(v);
    if (seen.length >= 2) break;
    await page.waitForTimeout(100);
  }
  const status = await page.textContent('#term-status');
  console.log(`build: progress seen ${seen.map((v) => (v * 100).toFixed(0) + '%').join(', ')}; status "${status}"`);
  if (seen.length < 2 || !(seen[1] > seen[0])) throw new Error(`the build's progress did not appear and grow: ${seen}`);
  if (!status.includes('Building')) throw new Error(`the status does not say the build: ${status}`);
  console.log('build: closing the page mid-build');
} finally {
  await browser.close();
}
