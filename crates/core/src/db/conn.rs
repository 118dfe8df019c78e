//! A pooled connection whose statements work on PostgreSQL directly and through PgBouncer in
//! transaction mode.
//!
//! tokio-postgres runs `query("…")` as a *named* prepared statement (`Parse s1`, then `Bind
//! s1`, then `Close s1`, each its own message batch) and `prepare_cached` keeps such a statement
//! for the connection's life. Behind PgBouncer in transaction mode (1.18, Debian bookworm's,
//! has no protocol-level prepared statements; `max_prepared_statements` came in 1.21) every
//! batch outside a transaction may land on another server connection: the `Bind` finds no
//! `s1` ("prepared statement does not exist"), and the `s1` left behind collides with the
//! next client's `s1` ("already exists"). So [`Conn`] keeps today's cached named statements
//! on a direct connection, and behind a pooler sends each statement as the *unnamed* one in a
//! single `Parse/Bind/Execute/Sync` batch (`query_typed`), which holds no state between
//! batches. The unnamed form needs each parameter's PostgreSQL type from the caller:
//! [`param_type`] reads it from the Rust value (the type it accepts, the one the server
//! inferred for it on the named path, since a mismatch fails there too).
//!
//! Inside a transaction PgBouncer keeps one server connection for the client, so a
//! [`Transaction`](deadpool_postgres::Transaction)'s `query("…")` (prepared, run and closed
//! before `COMMIT`) is safe either way; only statements kept across transactions
//! (`prepare_cached`) are not, and [`Conn::prepare_cached`] does not keep them behind a pooler.

use std::ops::{Deref, DerefMut};

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, Row};

use super::pool::Recycler;

/// What stands between Cascade and PostgreSQL (`PG_POOLER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// Connected to PostgreSQL itself: cached named statements, `statement_timeout` at connect.
    None,
    /// A transaction-mode pooler (PgBouncer): no state kept between transactions.
    PgBouncer,
    /// Probe at connect ([`detect`](super::pool)): `PgBouncer` when the server answers for
    /// PgBouncer's admin database, `None` otherwise.
    Auto,
}

impl Pooler {
    pub fn name(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::PgBouncer => "pgbouncer",
            Pooler::Auto => "auto",
        }
    }
}

/// A pooled connection (a `tokio_postgres` client with its statement cache). Its `query`,
/// `query_one`, `query_opt`, `execute` and `prepare_cached` take the place of the client's
/// (same signatures) and are safe behind PgBouncer in transaction mode; everything else is the
/// client's, through `Deref`.
pub struct Conn {
    object: deadpool::managed::Object<Recycler>,
    /// `PgBouncer` when the pool connects through a transaction-mode pooler (never `Auto`).
    pooler: Pooler,
}

/// A statement to run: SQL text, a statement of [`Conn::prepare_cached`], or one the caller
/// prepared (on a direct connection, or within one transaction).
pub trait Statement: Sync {
    #[doc(hidden)]
    fn form(&self) -> Form<'_>;
}

#[doc(hidden)]
pub enum Form<'a> {
    Text(&'a str),
    Prepared(&'a tokio_postgres::Statement),
}

impl Statement for str {
    fn form(&self) -> Form<'_> {
        Form::Text(self)
    }
}

impl Statement for String {
    fn form(&self) -> Form<'_> {
        Form::Text(self)
    }
}

impl Statement for tokio_postgres::Statement {
    fn form(&self) -> Form<'_> {
        Form::Prepared(self)
    }
}

/// A statement of [`Conn::prepare_cached`]: the connection's cached named statement on a
/// direct connection, its SQL text (sent unnamed each time) behind a pooler.
pub enum Prepared {
    Named(tokio_postgres::Statement),
    Unnamed(Box<str>),
}

impl Statement for Prepared {
    fn form(&self) -> Form<'_> {
        match self {
            Prepared::Named(statement) => Form::Prepared(statement),
            Prepared::Unnamed(sql) => Form::Text(sql),
        }
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Conn {
    pub(super) fn new(object: deadpool::managed::Object<Recycler>, pooler: Pooler) -> Conn {
        Conn { object, pooler }
    }

    pub(super) fn into_object(self) -> deadpool::managed::Object<Recycler> {
        self.object
    }

    /// Whether statements go through a transaction-mode pooler (sent unnamed).
    pub fn behind_pooler(&self) -> bool {
        self.pooler == Pooler::PgBouncer
    }

    /// The unnamed form of `statement` when behind a pooler and given as text.
    fn unnamed<'s, S: Statement + ?Sized>(&self, statement: &'s S) -> Option<&'s str> {
        match statement.form() {
            Form::Text(sql) if self.behind_pooler() => Some(sql),
            _ => None,
        }
    }

    pub async fn query<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        if let Some(sql) = self.unnamed(statement) {
            return self.object.query_typed(sql, &typed(params)).await;
        }
        match statement.form() {
            Form::Text(sql) => self.object.query(sql, params).await,
            Form::Prepared(statement) => self.object.query(statement, params).await,
        }
    }

    pub async fn query_one<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> Result<Row, Error> {
        if let Some(sql) = self.unnamed(statement) {
            return self.object.query_typed_one(sql, &typed(params)).await;
        }
        match statement.form() {
            Form::Text(sql) => self.object.query_one(sql, params).await,
            Form::Prepared(statement) => self.object.query_one(statement, params).await,
        }
    }

    pub async fn query_opt<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> Result<Option<Row>, Error> {
        if let Some(sql) = self.unnamed(statement) {
            return self.object.query_typed_opt(sql, &typed(params)).await;
        }
        match statement.form() {
            Form::Text(sql) => self.object.query_opt(sql, params).await,
            Form::Prepared(statement) => self.object.query_opt(statement, params).await,
        }
    }

    pub async fn execute<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> Result<u64, Error> {
        if let Some(sql) = self.unnamed(statement) {
            return self.object.execute_typed(sql, &typed(params)).await;
        }
        match statement.form() {
            Form::Text(sql) => self.object.execute(sql, params).await,
            Form::Prepared(statement) => self.object.execute(statement, params).await,
        }
    }

    /// The connection's cached named statement for `sql` (prepared on first use), or behind a
    /// pooler `sql` itself, sent unnamed each time (nothing is kept on a server connection).
    pub async fn prepare_cached(&self, sql: &str) -> Result<Prepared, Error> {
        if self.behind_pooler() {
            return Ok(Prepared::Unnamed(sql.into()));
        }
        Ok(Prepared::Named(self.object.prepare_cached(sql).await?))
    }
}

/// What runs statements: a pooled [`Conn`] (safe behind PgBouncer, see the module) or a
/// transaction (one server connection until it ends, so its own named statements are safe).
/// Functions that run on either take `&impl Sql`. A bare `tokio_postgres::Client` is one too,
/// for connections of their own to PostgreSQL itself; a pooled connection must be passed as
/// the [`Conn`], never as the client inside it (`&**conn` would leave named statements on
/// PgBouncer's server connections).
pub trait Sql: Sync {
    fn query<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;

    fn query_one<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send;

    fn query_opt<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send;

    fn execute<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

impl Sql for Conn {
    fn query<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        Conn::query(self, statement, params)
    }

    fn query_one<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        Conn::query_one(self, statement, params)
    }

    fn query_opt<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        Conn::query_opt(self, statement, params)
    }

    fn execute<S: Statement + ?Sized>(
        &self,
        statement: &S,
        params: Params<'_>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        Conn::execute(self, statement, params)
    }
}

/// Transactions run statements as tokio-postgres does: prepared, run and closed within the
/// transaction, on the one server connection PgBouncer keeps for it. So does a client of its
/// own (a test's, or one on `DATABASE_DIRECT_URL`), which must not go through PgBouncer.
macro_rules! transaction_sql {
    ($($ty:ty => $via:ty),*) => {$(
        impl Sql for $ty {
            async fn query<S: Statement + ?Sized>(
                &self,
                statement: &S,
                params: Params<'_>,
            ) -> Result<Vec<Row>, Error> {
                match statement.form() {
                    Form::Text(sql) => <$via>::query(self, sql, params).await,
                    Form::Prepared(st) => <$via>::query(self, st, params).await,
                }
            }

            async fn query_one<S: Statement + ?Sized>(
                &self,
                statement: &S,
                params: Params<'_>,
            ) -> Result<Row, Error> {
                match statement.form() {
                    Form::Text(sql) => <$via>::query_one(self, sql, params).await,
                    Form::Prepared(st) => <$via>::query_one(self, st, params).await,
                }
            }

            async fn query_opt<S: Statement + ?Sized>(
                &self,
                statement: &S,
                params: Params<'_>,
            ) -> Result<Option<Row>, Error> {
                match statement.form() {
                    Form::Text(sql) => <$via>::query_opt(self, sql, params).await,
                    Form::Prepared(st) => <$via>::query_opt(self, st, params).await,
                }
            }

            async fn execute<S: Statement + ?Sized>(
                &self,
                statement: &S,
                params: Params<'_>,
            ) -> Result<u64, Error> {
                match statement.form() {
                    Form::Text(sql) => <$via>::execute(self, sql, params).await,
                    Form::Prepared(st) => <$via>::execute(self, st, params).await,
                }
            }
        }
    )*};
}

transaction_sql!(
    tokio_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>,
    deadpool_postgres::Transaction<'_> => tokio_postgres::Transaction<'_>,
    tokio_postgres::Client => tokio_postgres::Client
);

impl Deref for Conn {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.object
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.object
    }
}

/// `params` with each one's PostgreSQL type, for the unnamed statement.
fn typed<'a>(params: Params<'a>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|&p| (p, param_type(p))).collect()
}

/// The types a parameter's Rust value may stand for, most specific first where a value
/// accepts several (a `serde_json::Value` is sent as `jsonb`, a `String` as `text`: the
/// server casts both where a column is `json` or `varchar`).
const CANDIDATES: &[Type] = &[
    Type::INT8,
    Type::INT4,
    Type::INT2,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::TEXT,
    Type::JSONB,
    Type::UUID,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::BYTEA,
    Type::NUMERIC,
    Type::INET,
    Type::OID,
    Type::CHAR,
    Type::INT8_ARRAY,
    Type::INT4_ARRAY,
    Type::INT2_ARRAY,
    Type::BOOL_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::TEXT_ARRAY,
    Type::JSONB_ARRAY,
    Type::UUID_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TIMESTAMP_ARRAY,
    Type::DATE_ARRAY,
    Type::BYTEA_ARRAY,
    Type::NUMERIC_ARRAY,
];

/// The PostgreSQL type `value` is sent as: the first of [`CANDIDATES`] it accepts
/// (`to_sql_checked` refuses a type the Rust type does not accept before encoding anything,
/// also for `None`); `unknown` when none, which the query then refuses with a message naming
/// the Rust type.
pub fn param_type(value: &(dyn ToSql + Sync)) -> Type {
    let mut scratch = bytes::BytesMut::new();
    for ty in CANDIDATES {
        scratch.clear();
        match value.to_sql_checked(ty, &mut scratch) {
            Err(err) if err.is::<tokio_postgres::types::WrongType>() => continue,
            _ => return ty.clone(),
        }
    }
    Type::UNKNOWN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_sent_as_the_type_their_rust_value_stands_for() {
        let text = String::from("a");
        let none: Option<i32> = None;
        let ids: Vec<i64> = vec![1];
        let names: &[&str] = &["a"];
        let json = serde_json::json!({"a": 1});
        let id = uuid::Uuid::nil();
        let cases: [(&(dyn ToSql + Sync), Type); 9] = [
            (&1_i64, Type::INT8),
            (&1_i32, Type::INT4),
            (&none, Type::INT4),
            (&text, Type::TEXT),
            (&"a", Type::TEXT),
            (&ids, Type::INT8_ARRAY),
            (&names, Type::TEXT_ARRAY),
            (&json, Type::JSONB),
            (&id, Type::UUID),
        ];
        for (value, want) in cases {
            assert_eq!(param_type(value), want, "{value:?}");
        }
    }
}
