/**
 * Counts passed and failed test cases in a JUnit XML report written by `deno test --junit-path`.
 * Prints "<passed> <failed>".
 *
 * @module
 */

const path = Deno.args[0];
let xml = "";
try {
  xml = Deno.readTextFileSync(path);
} catch {
  console.log("0 1"); // no report: the run itself failed
  Deno.exit(0);
}
let passed = 0;
let failed = 0;
const re = /<testcase\b[^>]*?(\/>|>([\s\S]*?)<\/testcase>)/g;
for (const m of xml.matchAll(re)) {
  const body = m[2] ?? "";
  if (/<failure\b|<error\b/.test(body)) failed++;
  else if (/<skipped\b/.test(body)) continue;
  else passed++;
}
console.log(`${passed} ${failed}`);
