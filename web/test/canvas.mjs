// Shared by the display tests: how many pixels of the viewer's canvas are
// lit (run in the page).
export const litPixels = () => {
  const c = document.querySelector('#display canvas');
  if (!c || !c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) lit++;
  return lit;
};

// How many pixels of the viewer's canvas are lit, and a checksum of them
// (which changes when anything is drawn), in `page`.
export const canvasPixels = (page) => page.evaluate(() => {
  const c = document.querySelector('#display canvas');
  if (!c || !c.width) return { lit: 0, sum: 0 };
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] || d[i + 1] || d[i + 2]) lit++;
    sum = (sum * 31 + d[i] + d[i + 1] * 7 + d[i + 2] * 13) >>> 0;
  }
  return { lit, sum };
});
