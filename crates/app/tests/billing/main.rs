//! Stripe billing end to end: the real application in-process (one or two instances), real
//! PostgreSQL and Redis, and Stripe played by the test kit's stand-in, which records events as
//! Stripe would send them and signs and delivers them.

mod checker;
mod checkout;
mod delivery;
mod doubt;
mod signatures;
mod support;
