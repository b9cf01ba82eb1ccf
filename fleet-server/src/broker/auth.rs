//! Connect-time authentication: the only check rumqttd can make on a client.

use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::LINK_CLIENT_ID;

/// Decides whether an MQTT CONNECT is accepted.
///
/// Called on rumqttd's listener thread, which serves every connection of that listener:
/// it must answer fast and never block (back it with an in-memory cache of the device
/// registry, not a database query). It should bind the client id to the credentials
/// (`client_id == username == device id` in `docs/protocol.md`): rumqttd drops an
/// existing connection when another one presents the same client id.
pub trait Authenticator: Send + Sync + 'static {
    /// `true` to accept the connection.
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool;
}

impl<F> Authenticator for F
where
    F: Fn(&str, &str, &str) -> bool + Send + Sync + 'static,
{
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        self(client_id, username, password)
    }
}

/// The rules the broker applies before asking the [`Authenticator`], and the switch that
/// refuses everyone after shutdown.
pub(super) struct AuthGate {
    inner: Box<dyn Authenticator>,
    open: AtomicBool,
}

impl std::fmt::Debug for AuthGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGate")
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl AuthGate {
    pub(super) fn new(inner: impl Authenticator) -> Arc<Self> {
        Arc::new(Self { inner: Box::new(inner), open: AtomicBool::new(true) })
    }

    /// Refuses every later connection attempt.
    pub(super) fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// Empty fields are refused (rumqttd would otherwise invent a client id), and so is the
    /// link's own client id, which would make rumqttd disconnect the link.
    pub(super) fn admit(&self, client_id: &str, username: &str, password: &str) -> bool {
        let admitted = self.open.load(Ordering::SeqCst)
            && !client_id.is_empty()
            && !username.is_empty()
            && !password.is_empty()
            && client_id != LINK_CLIENT_ID
            && self.inner.authenticate(client_id, username, password);
        if !admitted {
            tracing::info!(client_id, username, "mqtt connect refused");
        }
        admitted
    }

    /// The handler in rumqttd's shape (it expects a future; ours is ready at once).
    pub(super) fn handler(self: &Arc<Self>) -> rumqttd::AuthHandler {
        let gate = Arc::clone(self);
        Arc::new(move |client_id: String, username: String, password: String| {
            let admitted = ready(gate.admit(&client_id, &username, &password));
            Box::pin(admitted) as Pin<Box<dyn Future<Output = bool> + Send>>
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Arc<AuthGate> {
        AuthGate::new(|_: &str, _: &str, password: &str| password == "good")
    }

    #[test]
    fn refuses_empty_reserved_and_closed() {
        let gate = gate();
        assert!(gate.admit("trap-1", "trap-1", "good"));
        assert!(!gate.admit("trap-1", "trap-1", "bad"));
        assert!(!gate.admit("", "trap-1", "good"));
        assert!(!gate.admit("trap-1", "", "good"));
        assert!(!gate.admit("trap-1", "trap-1", ""));
        assert!(!gate.admit(LINK_CLIENT_ID, "trap-1", "good"));
        gate.close();
        assert!(!gate.admit("trap-1", "trap-1", "good"));
    }
}
