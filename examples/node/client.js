// Call a specdec cluster's public API (specdec.v1.GenerationService) from Node.js.
//
//   cd examples/node && npm install
//   node client.js [ADDRESS] [PROMPT] [MAX_TOKENS]      # defaults: 127.0.0.1:50051 "def fibonacci(n):" 32
//
// The .proto files are read at run time from SPECDEC_PROTO_DIR, by default this repository's
// protos/; with the Python package installed instead:
//   SPECDEC_PROTO_DIR=$(python -c "import specdec.client as c; print(c.PROTO_DIR)") node client.js
// TLS: SPECDEC_TLS_CA=certs/ca.pem; bearer token: SPECDEC_AUTH_TOKEN or SPECDEC_AUTH_TOKEN_FILE.
// SPECDEC_JSON=1 prints one JSON object instead of the text.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.SPECDEC_PROTO_DIR || path.resolve(__dirname, '..', '..', 'protos');
const [address = '127.0.0.1:50051', prompt = 'def fibonacci(n):', maxTokens = '32'] = process.argv.slice(2);

const definition = protoLoader.loadSync('specdec/v1/generation.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as in the .proto: max_new_tokens, token_ids
  enums: String, // DECODING_MODE_TREE, FINISH_REASON_EOS
  longs: Number,
  defaults: true,
  oneofs: true,
});
const { GenerationService } = grpc.loadPackageDefinition(definition).specdec.v1;

// gRPC's retry policy for the public API (UNAVAILABLE is retried with backoff), shipped with the protos.
const serviceConfig = fs.readFileSync(path.join(PROTO_DIR, 'specdec', 'v1', 'service_config.json'), 'utf8');
const caFile = process.env.SPECDEC_TLS_CA;
const credentials = caFile ? grpc.credentials.createSsl(fs.readFileSync(caFile)) : grpc.credentials.createInsecure();
const client = new GenerationService(address, credentials, {
  'grpc.service_config': serviceConfig,
  'grpc.enable_retries': 1,
});

const token = process.env.SPECDEC_AUTH_TOKEN_FILE
  ? fs.readFileSync(process.env.SPECDEC_AUTH_TOKEN_FILE, 'utf8').trim()
  : process.env.SPECDEC_AUTH_TOKEN;
const metadata = new grpc.Metadata();
if (token) metadata.add('authorization', `Bearer ${token}`);
const deadline = () => ({ deadline: Date.now() + 120_000 });

const request = { prompt, max_new_tokens: Number(maxTokens), mode: 'DECODING_MODE_TREE' };

function generate() {
  return new Promise((resolve, reject) => {
    client.Generate(request, metadata, deadline(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function stream(onChunk) {
  return new Promise((resolve, reject) => {
    const call = client.GenerateStream(request, metadata, deadline());
    call.on('data', onChunk);
    call.on('error', reject);
    call.on('end', resolve);
  });
}

async function main() {
  const json = process.env.SPECDEC_JSON === '1';
  const reply = await generate();
  const streamed = [];
  let finishReason = '';
  await stream((chunk) => {
    streamed.push(...chunk.token_ids);
    if (chunk.finish_reason !== 'FINISH_REASON_UNSPECIFIED') finishReason = chunk.finish_reason;
    if (!json) process.stdout.write(chunk.text);
  });
  if (json) {
    console.log(JSON.stringify({
      text: reply.text,
      token_ids: reply.token_ids,
      finish_reason: reply.finish_reason,
      streamed_token_ids: streamed,
      stream_finish_reason: finishReason,
    }));
  } else {
    const s = reply.stats;
    console.log(`\n\n${s.tokens_generated} tokens in ${s.rounds} rounds, ${s.tokens_per_second.toFixed(2)} tokens/s (${reply.finish_reason})`);
  }
  client.close();
}

main().catch((err) => {
  console.error(`specdec: ${grpc.status[err.code] || err.code}: ${err.details || err.message}`);
  process.exit(1);
});
