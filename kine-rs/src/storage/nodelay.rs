//! `TCP_NODELAY` on the connections to a database server.
//!
//! sqlx 0.9.0 no longer sets `TCP_NODELAY` (launchbadge/sqlx#4335, fixed upstream after that
//! release). Over TLS, a statement larger than one TLS record (16 KiB) leaves in two writes,
//! and Nagle's algorithm holds the second until the server's delayed ACK, about 40 ms later:
//! every large group-commit batch waited 40 ms for nothing (PostgreSQL over TLS committed
//! 2,400 puts/s instead of 18,000). sqlx does not expose its sockets, so after each new
//! connection this finds the process's TCP sockets connected to the server's port and sets the
//! option on them, through a duplicate of each descriptor taken with `pidfd_getfd` (socket
//! options belong to the socket, not the descriptor). Linux only; where the kernel refuses
//! (before 5.6), nothing changes but speed. Remove once sqlx sets the option again.

/// Sets `TCP_NODELAY` on every TCP connection of this process to a peer on `port`.
#[cfg(target_os = "linux")]
pub fn set_on_connections_to(port: u16) {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let Ok(me) = pidfd_open(getpid(), PidfdFlags::empty()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let Ok(socket) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let peer = rustix::net::getpeername(&socket)
            .ok()
            .flatten()
            .and_then(|peer| std::net::SocketAddr::try_from(peer).ok());
        if peer.is_some_and(|peer| peer.port() == port) {
            let _ = rustix::net::sockopt::set_tcp_nodelay(&socket, true);
        }
    }
}

/// Elsewhere the option stays as sqlx leaves it.
#[cfg(not(target_os = "linux"))]
pub fn set_on_connections_to(_port: u16) {}
