// A tribune.v1.RewardService client in another language, built from protos/ alone: the .proto is
// loaded at runtime (@grpc/proto-loader), nothing is generated from Python or copied by hand.
//
//   node clients/node/score.js HOST:PORT < request.json
//
// request.json: {"items": [{"prompt": ..., "response": ...}, ...], "best_of_n": {"prompt", "candidates"}}
// Prints one JSON object: the Score, ScoreBestOfN and ScoreStream replies, and the status of a
// request with a missing prompt (code and details), so a test can compare them with Python's.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

function loadService() {
  const definition = protoLoader.loadSync("tribune/v1/reward.proto", {
    includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  return grpc.loadPackageDefinition(definition).tribune.v1.RewardService;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function stream(client, requests) {
  return new Promise((resolve, reject) => {
    const call = client.ScoreStream({ deadline: Date.now() + 30000 });
    const replies = [];
    call.on("data", (reply) => replies.push(reply));
    call.on("error", reject);
    call.on("end", () => resolve(replies));
    for (const r of requests) call.write(r);
    call.end();
  });
}

async function main() {
  const target = process.argv[2];
  if (!target) throw new Error("usage: node score.js HOST:PORT < request.json");
  const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const RewardService = loadService();
  const client = new RewardService(target, grpc.credentials.createInsecure());
  const out = {};
  out.score = await unary(client, "Score", { items: input.items, request_id: "node-1" });
  out.best_of_n = await unary(client, "ScoreBestOfN", input.best_of_n);
  out.stream = await stream(client, input.items.map((item) => ({ items: [item] })));
  try {
    await unary(client, "Score", { items: [{ response: "no prompt" }] });
    out.invalid = { code: "OK" };
  } catch (err) {
    out.invalid = { code: grpc.status[err.code], details: err.details };
  }
  client.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`node client failed: ${err.message}\n`);
  process.exit(1);
});
