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
