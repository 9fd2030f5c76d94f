// What every browser test script shares: steps, assertions, polling, the failure screenshot
// and the run with its overall timeout and exit codes (0 pass, 1 fail, 3 gave up).
// Output lines are prefixed with the script's file name, e.g. "[map.mjs]".

import path from 'node:path';
import { chromium } from 'playwright-core';

const NAME = path.basename(process.argv[1] || 'browser-test');
let currentStep = 'start';

export function step(name) {
  currentStep = name;
  console.log(`[${NAME}] ${name}`);
}

export class TestFailure extends Error {}
export function fail(msg) { throw new TestFailure(msg); }
export function assert(cond, msg) { if (!cond) fail(msg); }

/** A `poll(what, fn, timeoutMs = defaultTimeoutMs)`: calls `fn` every `everyMs` until it returns
 * something truthy (which it returns), failing with `what` once the time is up. */
export function poller(defaultTimeoutMs, everyMs = 200) {
  return async function poll(what, fn, timeoutMs = defaultTimeoutMs) {
    const deadline = Date.now() + timeoutMs;
    let last;
    for (;;) {
      try {
        last = await fn();
        if (last) return last;
      } catch (e) {
        last = e;
      }
      if (Date.now() > deadline) fail(`timed out after ${timeoutMs} ms waiting for ${what}${last instanceof Error ? ` (last error: ${last.message})` : ''}`);
      await new Promise((r) => setTimeout(r, everyMs));
    }
  };
}

/** On a failure: a screenshot of the page next to `shot` (".failure.png") and the page's
 * problems seen so far. */
export async function reportFailure(page, shot, problems, { fullPage = true } = {}) {
  if (page) {
    const failShot = shot.replace(/(\.png)?$/, '.failure.png');
    await page.screenshot({ path: failShot, fullPage }).catch(() => {});
    console.error(`[${NAME}] screenshot of the failure: ${failShot}`);
  }
  if (problems.length) console.error(`[${NAME}] page problems seen:\n  ${problems.join('\n  ')}`);
}

/** Runs `main`, exits 0 when it passes, 1 when it fails, 3 when it takes over `overallTimeoutMs`. */
export function run(main, overallTimeoutMs) {
  const timer = setTimeout(() => {
    console.error(`[${NAME}] FAIL: gave up after ${overallTimeoutMs / 1000} s (step: ${currentStep})`);
    process.exit(3);
  }, overallTimeoutMs);
  main().then(() => {
    clearTimeout(timer);
    console.log(`[${NAME}] PASS`);
    process.exit(0);
  }, (e) => {
    clearTimeout(timer);
    console.error(`[${NAME}] FAIL in step "${currentStep}": ${e instanceof TestFailure ? e.message : (e && e.stack) || e}`);
    process.exit(1);
  });
}

/** The script's arguments, named in order (all required; `node <script> <name> ...` is printed and
 * the script exits 2 when one is missing). `base_url` loses any trailing slash and
 * `screenshot_path` is made absolute. */
export function args(...names) {
  const values = process.argv.slice(2);
  if (names.some((_, i) => !values[i])) {
    console.error(`usage: node ${NAME} ${names.map((n) => `<${n}>`).join(' ')}`);
    process.exit(2);
  }
  const named = Object.fromEntries(names.map((name, i) => [name, values[i]]));
  if (named.base_url) named.base_url = named.base_url.replace(/\/+$/, '');
  if (named.screenshot_path) named.screenshot_path = path.resolve(named.screenshot_path);
  return named;
}

/** Debian's Chromium (`FLEETWATCH_CHROMIUM` overrides the path), headless unless
 * `FLEETWATCH_HEADED=1`, without anything that reaches out to the network by itself. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.FLEETWATCH_CHROMIUM || '/usr/bin/chromium',
    headless: process.env.FLEETWATCH_HEADED !== '1',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}
