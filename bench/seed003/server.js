// Seed 003's own stack as its README describes it, for the benchmark's miss-heavy row (SPEC:
// "Miss-heavy reads: at least 2x seed 003's own stack (fastify + pg + ioredis)"): fastify,
// node-postgres and ioredis, cache-aside (Redis GET, else the row from PostgreSQL, then SET
// with the assets' TTL of 300 s before answering), one process per core (node's cluster
// module). Not part of the product. Env: PG_URL, REDIS_URL, PORT, WORKERS (default 2),
// PG_POOL_MAX (default 10).
"use strict";
const cluster = require("node:cluster");

if (cluster.isPrimary) {
  const workers = Number(process.env.WORKERS || 2);
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on("exit", (_worker, code) => {
    console.error(`a worker exited (${code})`);
    process.exit(1);
  });
} else {
  // The primary gone (killed by the benchmark), the worker goes too.
  process.on("disconnect", () => process.exit(0));
  const fastify = require("fastify")({ logger: false });
  const { Pool } = require("pg");
  const Redis = require("ioredis");
  const pool = new Pool({
    connectionString: process.env.PG_URL,
    max: Number(process.env.PG_POOL_MAX || 10),
  });
  const redis = new Redis(process.env.REDIS_URL);
  const TTL_SECONDS = 300;
  const ASSET = {
    name: "asset",
    text:
      "SELECT version_id, producer_id, name, metadata, created_at, updated_at " +
      "FROM assets WHERE version_id = $1",
  };

  fastify.get("/health", async () => ({ status: "ok" }));
  fastify.get("/listings/:id", async (request, reply) => {
    const key = `seed003:assets:${request.params.id}`;
    reply.type("application/json");
    const cached = await redis.get(key);
    if (cached !== null) return cached;
    const { rows } = await pool.query({ ...ASSET, values: [request.params.id] });
    if (rows.length === 0) {
      reply.code(404);
      return JSON.stringify({ error: "not_found" });
    }
    const row = rows[0];
    const body = JSON.stringify({
      versionId: row.version_id,
      producerId: row.producer_id,
      name: row.name,
      metadata: row.metadata,
      createdAt: row.created_at,
      updatedAt: row.updated_at,
    });
    await redis.set(key, body, "EX", TTL_SECONDS);
    return body;
  });
  fastify.listen({ host: "127.0.0.1", port: Number(process.env.PORT) }).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
