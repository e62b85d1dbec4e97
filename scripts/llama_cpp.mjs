// Drives llama.cpp (the prebuilt CPU binary of node-llama-cpp) for the GGUF export's tests
// and benchmarks: reads one JSON request on stdin, writes one JSON answer on stdout.
//
// request: {package: folder holding node_modules/node-llama-cpp (npm --prefix),
//           model: GGUF path, threads, context (tokens), kv_cache: "F32" | null (F16),
//           prompts: [text], max_tokens, logits: "none" | "first" | "all"}
// answer:  {llama_cpp: release, node_llama_cpp: version, add_bos, bos, results: [{
//           prompt_ids, tokens (greedy, llama.cpp's sampler at temperature 0, end of text
//           not special), logits (per position: "first" = after the prompt, "all" = also
//           after each generated token but the last), prefill_s, decode_s}]}
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const request = JSON.parse(readFileSync(0, "utf8"));
const root = join(request.package, "node_modules", "node-llama-cpp");
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(join(root, "dist", "index.js")));
const release = JSON.parse(readFileSync(join(root, "llama", "binariesGithubRelease.json"), "utf8"));
const version = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).version;

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const kv = request.kv_cache ?? "F16";
const context = await model.createContext({
  contextSize: request.context ?? 512,
  threads: { ideal: request.threads ?? 1, min: request.threads ?? 1 },
  flashAttention: false,
  experimentalKvCacheKeyType: kv,
  experimentalKvCacheValueType: kv,
});
const sequence = context.getSequence();

function logitsArray(map) {
  const out = new Array(map.size);
  for (const [token, value] of map) out[token] = value;
  return out;
}

async function logitsAlong(ids, from) {
  // llama.cpp's logits after each of ids[from - 1 ..] (teacher-forced, one pass)
  await sequence.clearHistory();
  const input = ids.map((t, i) => (i >= from - 1 ? [t, { generateNext: { logits: true } }] : t));
  const outputs = await sequence.controlledEvaluate(input);
  return outputs.slice(from - 1).map((o) => logitsArray(o.next.logits));
}

const results = [];
for (const prompt of request.prompts) {
  const text = model.tokenize(prompt, true);
  const promptIds = model.tokens.shouldPrependBosToken ? [model.tokens.bos, ...text] : text;
  await sequence.clearHistory();
  const tokens = [];
  const start = performance.now();
  let first = start;
  const steps = sequence.evaluate(promptIds, { temperature: 0, yieldEogToken: true });
  for await (const token of steps) {
    if (tokens.length === 0) first = performance.now();
    tokens.push(token);
    if (tokens.length >= request.max_tokens) break;
  }
  const end = performance.now();
  const result = { prompt_ids: promptIds, tokens, prefill_s: (first - start) / 1000,
                   decode_s: (end - first) / 1000 };
  if (request.logits === "first") result.logits = await logitsAlong(promptIds, promptIds.length);
  if (request.logits === "all") {
    result.logits = await logitsAlong([...promptIds, ...tokens.slice(0, -1)], promptIds.length);
  }
  results.push(result);
}
process.stdout.write(JSON.stringify({
  llama_cpp: release.release, node_llama_cpp: version, add_bos: model.tokens.shouldPrependBosToken,
  bos: model.tokens.bos, results,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
