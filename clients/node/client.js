#!/usr/bin/env node
// Node.js client for fcl-server: Health.Check, Register (client token) and GetStatus (admin token),
// printed as one JSON object. Loads the wire contract (protos/fcl/v1/fcl.proto) at run time and the
// standard health proto vendored under ./proto (grpc/health/v1/health.proto, unchanged from grpc-proto).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const VERSION = require('./package.json').version;
const COMMANDS = ['health', 'register', 'status'];
const USAGE = `usage: node client.js [options] [health] [register] [status]

Calls the named RPCs in that order (default: health, then register when a client token is given, then
status when an admin token is given) and prints {"health": ..., "register": ..., "status": ...}.
Messages use the proto field names; enums are names; int64 fields are strings (proto3 JSON mapping).
On a failed call it prints what it has plus "error": {"call", "code", "details"} and exits 1.

options:
  --server HOST:PORT        fcl-server address (env FCL_SERVER; default 127.0.0.1:50051)
  --client-id ID            this client's id, as enrolled (register)
  --token-file FILE         client bearer token from \`fcl-server enroll ID\` (or env FCL_TOKEN)
  --admin-token-file FILE   admin token from \`fcl-server enroll --admin NAME\` (or env FCL_ADMIN_TOKEN)
  --service NAME            service to ask Health.Check about (default "": the whole server)
  --tls-ca FILE             CA of the server certificate: enables TLS
  --tls-cert FILE           client certificate chain for mutual TLS (PEM)
  --tls-key FILE            client private key for mutual TLS (PEM)
  --proto-dir DIR           root of the fcl protos (default: the repository's protos/)
  --timeout SECONDS         deadline of each call (default 10)
  -h, --help                this text`;

const OPTIONS = {
  server: { type: 'string' },
  'client-id': { type: 'string' },
  'token-file': { type: 'string' },
  'admin-token-file': { type: 'string' },
  service: { type: 'string', default: '' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'proto-dir': { type: 'string', default: path.resolve(__dirname, '..', '..', 'protos') },
  timeout: { type: 'string', default: '10' },
  help: { type: 'boolean', short: 'h' },
};

class UsageError extends Error {}

/** Load fcl.v1 and grpc.health.v1; keepCase and String longs give the proto3 JSON field names and int64s. */
function loadProtos(protoDir) {
  const definition = protoLoader.loadSync(['fcl/v1/fcl.proto', 'grpc/health/v1/health.proto'], {
    includeDirs: [protoDir, path.join(__dirname, 'proto')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition);
}

/** A token from its file (trailing newline dropped) or the environment; undefined when neither is set. */
function readToken(file, envName) {
  const token = file ? fs.readFileSync(file, 'utf8').trim() : (process.env[envName] || '').trim();
  if (file && !token) throw new UsageError(`the token file ${file} is empty`);
  return token || undefined;
}

function credentials(opts) {
  if (!opts['tls-ca']) {
    if (opts['tls-cert'] || opts['tls-key']) throw new UsageError('--tls-cert/--tls-key need --tls-ca');
    return grpc.credentials.createInsecure();
  }
  if (Boolean(opts['tls-cert']) !== Boolean(opts['tls-key'])) {
    throw new UsageError('give both --tls-cert and --tls-key (mutual TLS) or neither');
  }
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(opts['tls-ca']), read(opts['tls-key']), read(opts['tls-cert']));
}

function bearer(token) {
  const metadata = new grpc.Metadata();
  metadata.add('authorization', `Bearer ${token}`);
  return metadata;
}

/** One unary call as a promise; rejects with the gRPC error. */
function unary(client, method, request, metadata, timeoutS) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    const done = (err, response) => (err ? reject(err) : resolve(response));
    client[method](request, metadata, { deadline }, done);
  });
}

function parse(argv) {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const unknown = positionals.filter((c) => !COMMANDS.includes(c));
  if (unknown.length) {
    throw new UsageError(`unknown command ${unknown.join(', ')} (known: ${COMMANDS.join(', ')})`);
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) {
    throw new UsageError(`--timeout must be a positive number of seconds, not ${values.timeout}`);
  }
  return { opts: { ...values, timeout }, commands: positionals };
}

/** The calls to make, each a function returning a promise of its response. */
function plan(opts, commands, proto) {
  const server = opts.server || process.env.FCL_SERVER || '127.0.0.1:50051';
  const token = readToken(opts['token-file'], 'FCL_TOKEN');
  const admin = readToken(opts['admin-token-file'], 'FCL_ADMIN_TOKEN');
  const wanted = commands.length
    ? commands
    : ['health', ...(token ? ['register'] : []), ...(admin ? ['status'] : [])];
  // refuse a call that lacks what it needs before any call is made
  if (wanted.includes('register') && !(token && opts['client-id'])) {
    throw new UsageError('register needs --client-id and a client token (--token-file or FCL_TOKEN)');
  }
  if (wanted.includes('status') && !admin) {
    throw new UsageError('status needs an admin token (--admin-token-file or FCL_ADMIN_TOKEN)');
  }
  const creds = credentials(opts);
  const fcl = new proto.fcl.v1.FclService(server, creds);
  const health = new proto.grpc.health.v1.Health(server, creds);
  // fm_digest stays empty: this client has no FM (the server then says fm_matches: false)
  const register = { client_id: opts['client-id'], fm_digest: '', client_version: `node-${VERSION}` };
  const calls = {
    health: () => unary(health, 'Check', { service: opts.service }, new grpc.Metadata(), opts.timeout),
    register: () => unary(fcl, 'Register', register, bearer(token), opts.timeout),
    status: () => unary(fcl, 'GetStatus', { max_jobs: 100 }, bearer(admin), opts.timeout),
  };
  const names = { health: 'Health.Check', register: 'Register', status: 'GetStatus' };
  return {
    steps: wanted.map((c) => [c, names[c], calls[c]]),
    close: () => [fcl, health].forEach((c) => c.close()),
  };
}

async function main(argv) {
  let parsed;
  try {
    parsed = parse(argv);
  } catch (err) {
    process.stderr.write(`fcl-node-client: ${err.message}\n${USAGE}\n`);
    return 2;
  }
  if (parsed.opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const out = {};
  let exitCode = 0;
  let close = () => {};
  try {
    const proto = loadProtos(parsed.opts['proto-dir']);
    const { steps, close: closeClients } = plan(parsed.opts, parsed.commands, proto);
    close = closeClients;
    for (const [key, call, run] of steps) {
      try {
        out[key] = await run();
      } catch (err) {
        if (typeof err.code !== 'number') throw err; // not a gRPC status
        out.error = { call, code: grpc.status[err.code], details: err.details };
        exitCode = 1;
        break;
      }
    }
  } catch (err) {
    process.stderr.write(`fcl-node-client: ${err.message}\n`);
    return 2;
  } finally {
    close();
  }
  process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  return exitCode;
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { main, loadProtos };
