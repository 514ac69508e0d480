// Browser test of graphical packages' displays, in Debian's headless
// chromium: launch xeyes from the page, see its first frame through noVNC
// (not blank), move the pointer over it and see the screen change; then
// launch mousepad, type into it and see the text appear; paste text sent
// from the page, copy the whole text in mousepad and read it on the page.
//   node test/display.mjs BASE_URL TOKEN SCREENSHOT.png
import { launchBrowser } from './browser.mjs';
import { canvasPixels, litPixels } from './canvas.mjs';

const [base, token, shot] = process.argv.slice(2);
if (!base || !token || !shot) {
  console.error('usage: node test/display.mjs BASE_URL TOKEN SCREENSHOT.png');
  process.exit(2);
}

const browser = await launchBrowser();
const step = (m) => console.log(`display: ${m}`);
// Pixels of the viewer's canvas: how many are lit, and a checksum.
const pixels = () => canvasPixels(page);
let page;
try {
  page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(`${base}/#token=${token}`);
  await page.waitForSelector('button[data-launch="xeyes"]', { timeout: 10000 });

  step('launch xeyes; its first frame arrives through the viewer');
  const t0 = Date.now();
  await page.click('button[data-launch="xeyes"]');
  await page.waitForFunction(`(${litPixels})() > 0`, null, { timeout: 60000, polling: 20 });
  console.log(`first frame after ${Date.now() - t0} ms`);
  const before = await pixels();
  if (before.lit < 500) throw new Error(`the screen is nearly blank: ${before.lit} pixels lit`);
  await page.screenshot({ path: shot });

  step('move the pointer over the display: the eyes follow it');
  const box = await page.locator('#display canvas').boundingBox();
  let changed = false;
  for (let i = 0; i < 20 && !changed; i++) {
    const x = box.x + (i % 2 ? box.width * 0.9 : 5);
    const y = box.y + (i % 2 ? box.height * 0.9 : 5);
    await page.mouse.move(x, y, { steps: 5 });
    await page.mouse.click(x, y);
    await page.waitForTimeout(500);
    changed = (await pixels()).sum !== before.sum;
  }
  if (!changed) throw new Error('the display did not change when the pointer moved');

  step('the display grows with the window, and the screen fits it when asked');
  const before1 = await page.locator('#display canvas').boundingBox();
  await page.setViewportSize({ width: 1500, height: 1100 });
  await page.waitForFunction((w) => document.querySelector('#display canvas').getBoundingClientRect().width > w,
    before1.width, { timeout: 10000 });
  const guestWidth = () => page.evaluate(() => document.querySelector('#display canvas').width);
  const oldWidth = await guestWidth();
  await page.click('#fit-screen');
  await page.waitForFunction(() => document.getElementById('term-status').textContent.startsWith('The screen is'),
    null, { timeout: 30000 });
  await page.waitForFunction((w) => document.querySelector('#display canvas').width !== w, oldWidth, { timeout: 30000 });
  console.log(`the guest's screen went from ${oldWidth} to ${await guestWidth()} pixels wide`);
  await page.setViewportSize({ width: 1200, height: 900 });

  step('launch mousepad; type into it');
  await page.click('button[data-launch="mousepad"]');
  await page.waitForFunction(() => document.getElementById('term-title').textContent.startsWith('mousepad'),
    null, { timeout: 60000 });
  await page.waitForFunction(`(${litPixels})() > 10000`, null, { timeout: 60000, polling: 50 });
  const editor = await page.locator('#display canvas').boundingBox();
  // The text area: below the menu bar, inside the window at the top left.
  await page.mouse.click(editor.x + editor.width * 0.15, editor.y + editor.height * 0.3);
  await page.waitForTimeout(500);
  const empty = await pixels();
  await page.keyboard.type('strata types here', { delay: 30 });
  let typed = false;
  for (let i = 0; i < 40 && !typed; i++) {
    await page.waitForTimeout(250);
    typed = (await pixels()).sum !== empty.sum;
  }
  await page.screenshot({ path: shot.replace(/\.png$/, '-typed.png') });
  if (!typed) throw new Error('typing did not change the display');

  step('clipboard both ways: send text, paste it in mousepad, copy everything back');
  // Under load a paste can lag behind the keys that follow it; each round
  // sends the text again (mousepad's own copy replaced it) and tries again.
  const status = (t) => page.waitForFunction((x) => document.getElementById('term-status').textContent.includes(x), t, { timeout: 20000 });
  let copied = '';
  for (let i = 0; i < 8 && !copied.includes('and pasted from the page'); i++) {
    await page.fill('#clip', ' and pasted from the page');
    await page.click('#clip-send');
    await status('sent');
    await page.mouse.click(editor.x + editor.width * 0.6, editor.y + editor.height * 0.6);
    await page.keyboard.press('Control+End');
    await page.keyboard.press('Control+v');
    await page.waitForTimeout(1000 + 500 * i);
    await page.keyboard.press('Control+a');
    await page.keyboard.press('Control+c');
    await page.waitForTimeout(500);
    await page.fill('#clip', '');
    await page.click('#clip-get');
    await status('copied');
    copied = await page.inputValue('#clip');
    await page.evaluate(() => { document.getElementById('term-status').textContent = ''; });
  }
  if (!copied.startsWith('strata types here') || !copied.includes(' and pasted from the page')) {
    throw new Error(`the VM's clipboard holds ${JSON.stringify(copied)}`);
  }
  step('ok');
} finally {
  await browser.close();
}
