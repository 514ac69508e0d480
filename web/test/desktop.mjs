// Browser test of a desktop application launched from its launch image, in
// Debian's headless chromium: its window is drawn at once (the first frame
// through noVNC, not blank), typing shows (writer), a click selects a cell
// (calc), and the clipboard carries text both ways (writer).
//   node test/desktop.mjs BASE_URL TOKEN PACKAGE writer|calc|view SCREENSHOT.png
import { launchBrowser } from './browser.mjs';
import { canvasPixels, litPixels } from './canvas.mjs';

const [base, token, pkg, mode, shot] = process.argv.slice(2);
if (!base || !token || !pkg || !['writer', 'calc', 'view'].includes(mode) || !shot) {
  console.error('usage: node test/desktop.mjs BASE_URL TOKEN PACKAGE writer|calc|view SCREENSHOT.png');
  process.exit(2);
}

const browser = await launchBrowser();
const step = (m) => console.log(`desktop: ${m}`);
const pixels = () => canvasPixels(page);
// Waits (up to `ms`) until the display differs from `from`.
const changes = async (from, ms) => {
  for (let waited = 0; waited < ms; waited += 250) {
    await page.waitForTimeout(250);
    if ((await pixels()).sum !== from.sum) return true;
  }
  return false;
};
let page;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 960 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(`${base}/#token=${token}`);
  await page.waitForSelector(`button[data-launch="${pkg}"]`, { timeout: 10000 });

  step(`launch ${pkg}; its window arrives through the viewer`);
  const t0 = Date.now();
  await page.click(`button[data-launch="${pkg}"]`);
  await page.waitForFunction(`(${litPixels})() > 20000`, null, { timeout: 120000, polling: 20 });
  console.log(`first frame after ${Date.now() - t0} ms`);
  await page.waitForTimeout(1500);
  await page.screenshot({ path: shot });
  const box = await page.locator('#display canvas').boundingBox();

  if (mode === 'writer') {
    step('type into the document: the text is drawn');
    await page.mouse.click(box.x + box.width * 0.5, box.y + box.height * 0.45);
    await page.waitForTimeout(500);
    const empty = await pixels();
    const t1 = Date.now();
    await page.keyboard.type('strata writes here', { delay: 20 });
    if (!(await changes(empty, 30000))) throw new Error('typing did not change the display');
    console.log(`typed text drawn ${Date.now() - t1} ms after the first key`);
    await page.waitForTimeout(1500);
    await page.screenshot({ path: shot.replace(/\.png$/, '-typed.png') });

    step('clipboard both ways: paste text sent from the page, copy everything back');
    const status = (t) => page.waitForFunction((x) => document.getElementById('term-status').textContent.includes(x), t, { timeout: 20000 });
    let copied = '';
    for (let i = 0; i < 6 && !copied.includes('and pasted from the page'); i++) {
      await page.fill('#clip', ' and pasted from the page');
      await page.click('#clip-send');
      await status('sent');
      await page.mouse.click(box.x + box.width * 0.5, box.y + box.height * 0.45);
      await page.keyboard.press('Control+End');
      await page.keyboard.press('Control+Shift+v');
      await page.waitForTimeout(1000);
      await page.keyboard.press('Enter');
      await page.waitForTimeout(1500 + 500 * i);
      await page.keyboard.press('Control+a');
      await page.keyboard.press('Control+c');
      await page.waitForTimeout(1000);
      await page.fill('#clip', '');
      await page.click('#clip-get');
      await status('copied');
      copied = await page.inputValue('#clip');
      await page.evaluate(() => { document.getElementById('term-status').textContent = ''; });
    }
    // (Writer's autocorrect capitalizes the sentence's first letter.)
    if (!/strata writes here/i.test(copied) || !copied.includes('and pasted from the page')) {
      throw new Error(`the VM's clipboard holds ${JSON.stringify(copied)}`);
    }
  }
  if (mode === 'writer') {
    step('the screen follows the window: fit it, and the document is drawn at the new size');
    await page.setViewportSize({ width: 1500, height: 1000 });
    const guestWidth = () => page.evaluate(() => document.querySelector('#display canvas').width);
    const oldWidth = await guestWidth();
    await page.click('#fit-screen');
    await page.waitForFunction((w) => document.querySelector('#display canvas').width !== w, oldWidth, { timeout: 30000 });
    await page.waitForFunction(`(${litPixels})() > 20000`, null, { timeout: 30000, polling: 50 });
    console.log(`the guest's screen went from ${oldWidth} to ${await guestWidth()} pixels wide`);
    await page.waitForTimeout(2000);
    await page.screenshot({ path: shot.replace(/\.png$/, '-fit.png') });
  }
  if (mode === 'calc') {
    step('click a cell and type: the sheet changes');
    const before = await pixels();
    await page.mouse.click(box.x + box.width * 0.3, box.y + box.height * 0.5);
    await page.keyboard.type('42', { delay: 20 });
    await page.keyboard.press('Enter');
    if (!(await changes(before, 30000))) throw new Error('the sheet did not change');
    await page.waitForTimeout(1500);
    await page.screenshot({ path: shot.replace(/\.png$/, '-typed.png') });
  }
  step('ok');
} finally {
  await browser.close();
}
