//! The catalog module end to end: the real application (`cascade_server::testing::TestApp`,
//! in-process, one per instance) on a private PostgreSQL and Redis, driven over HTTP.

mod support;

mod audit;
mod batched_reads;
mod bodies;
mod bounds;
mod bundle;
mod concurrent_writes;
mod disconnect;
mod freshness;
mod input;
mod lineage;
mod listings;
mod paused_redis;
mod ready;
mod replica;
mod writes;
