//! NATS failures as kine-rs errors: anything that a retry may fix is `Unavailable`. Messages
//! come from async-nats, which never echoes the endpoint's credentials.

use std::fmt::Display;

use crate::error::KineError;

/// A failure of `what`, worth a retry.
pub fn unavailable(what: &str, error: impl Display) -> KineError {
    KineError::Unavailable(format!("NATS: {what}: {error}"))
}

/// A failure of `what` that a retry will not fix.
pub fn storage(what: &str, error: impl Display) -> KineError {
    KineError::Storage(format!("NATS: {what}: {error}"))
}
