// A labeller at `tribune label --serve`, in headless Chromium, with the keyboard alone.
// usage: node label_with_keyboard.mjs URL LABELLER < plan.json
// plan: [{"rank": [text, ...]} | {"keys": ["s"]} ...], one step per shown prompt: "rank" presses the
// digits of the wanted order's candidates as the page shows them (best first), then Enter.
// Prints {"seen": [{prompt, candidates}] before each step, "progress": the page's last progress line}.
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [url, labeller] = process.argv.slice(2);
let input = "";
for await (const chunk of process.stdin) input += chunk;
const plan = JSON.parse(input);

const browser = await puppeteer.launch({executablePath: await chromium.executablePath(), args: chromium.args,
                                        headless: true});
try {
  const page = await browser.newPage();
  page.on("dialog", (dialog) => dialog.accept(labeller));      // the page asks once for the labeller's id
  await page.goto(url + "/", {waitUntil: "networkidle0"});
  const text = (sel) => page.$eval(sel, (e) => e.textContent);
  await page.waitForFunction(() => document.querySelectorAll("#cands .cand").length > 0);
  const seen = [];
  for (const step of plan) {
    const prompt = await text("#prompt");
    const shown = await page.$$eval("#cands .cand .text", (es) => es.map((e) => e.textContent));
    seen.push({prompt, candidates: shown});
    let keys = step.keys;
    if (step.rank) {
      keys = step.rank.slice(0, shown.length - 1).map((t) => {
        const i = shown.indexOf(t);
        if (i < 0) throw new Error(`"${t}" is not among ${JSON.stringify(shown)}`);
        return String(i + 1);
      });
      keys.push("Enter");                                     // the last one is ranked last by itself
    }
    for (const key of keys) await page.keyboard.press(key);
    // the page shows the next prompt (or the one undone) once the server has the answer
    await page.waitForFunction((p) => document.getElementById("prompt").textContent !== p, {timeout: 30000}, prompt);
  }
  console.log(JSON.stringify({seen, progress: await text("#progress"), prompt: await text("#prompt")}));
} finally {
  await browser.close();
}
