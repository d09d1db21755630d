//! What a database error means for a batch: retry it, absorb a duplicate, or keep a refused row apart.

use std::time::Duration;

/// Why a batch was not written; every cause here is worth a retry (rows refused for good are dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("the batch transaction failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the batch did not finish within {0:?}")]
    Timeout(Duration),
}

impl CopyError {
    /// Why, in a word that makes a small label set: the SQLSTATE class (`sqlstate_42` for a privilege, say), or
    /// `connection` / `timeout` when PostgreSQL gave no code.
    pub fn reason(&self) -> String {
        let code = match self {
            CopyError::Postgres(e) => e.code(),
            CopyError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.code(),
            CopyError::Timeout(_) => return "timeout".to_owned(),
            CopyError::Pool(_) => None,
        };
        match code {
            Some(state) => format!("sqlstate_{}", &state.code()[..2]),
            None => "connection".to_owned(),
        }
    }
}

impl CopyError {
    /// Whether trying again can succeed: a connection, a timeout, or a database error [`classify`] calls transient.
    pub fn is_retriable(&self) -> bool {
        match self {
            CopyError::Postgres(e) => classify(e) == Failure::Transient,
            CopyError::Pool(_) | CopyError::Timeout(_) => true,
        }
    }
}

/// What a database error means for the rows that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Retrying can fix it: the connection, the server's state, a conflict with another transaction.
    Transient,
    /// A row with the same natural key is already stored.
    Duplicate,
    /// PostgreSQL refuses the row itself: retrying would fail the same way.
    Rejected,
}

/// Sorts an error into [`Failure`]; kept apart from the IO so that the rule is plain to read and test.
pub fn classify(error: &tokio_postgres::Error) -> Failure {
    let Some(state) = error.code() else {
        return Failure::Transient;
    };
    let code = state.code();
    if code == "23505" {
        return Failure::Duplicate;
    }
    // 22 data exception, 23 integrity constraint, P0 raised by a trigger, 2F/39 routine errors, 44 check option.
    if ["22", "23", "P0", "2F", "39", "44"]
        .iter()
        .any(|class| code.starts_with(class))
    {
        Failure::Rejected
    } else {
        Failure::Transient
    }
}
