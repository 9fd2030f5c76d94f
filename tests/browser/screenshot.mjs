// Takes a screenshot of the live map as a person sees it (for docs/screenshot-map.png).
// Usage: node tests/browser/screenshot.mjs <base_url> <out.png> [wait_seconds]
import { chromium } from 'playwright-core';

const [base, out, waitSeconds = '5'] = process.argv.slice(2);
if (!base || !out) {
  console.error('usage: node tests/browser/screenshot.mjs <base_url> <out.png> [wait_seconds]');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.FLEETWATCH_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  await page.goto(base);
  await page.waitForFunction(
    () => document.querySelector('#connection-state')?.textContent.includes('connected'),
    null, { timeout: 15000 });
  // Let live events arrive so markers move and alarms fill the feed.
  await page.waitForTimeout(Number(waitSeconds) * 1000);
  await page.screenshot({ path: out });
  console.log(`saved ${out}`);
} finally {
  await browser.close();
}
