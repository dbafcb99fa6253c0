//! Who is knocking: the unit a per-address limit counts, and a gate that caps how many
//! handshakes one such unit has in progress.
//!
//! Anyone who can reach the port can open connections, so every limit that protects the
//! door is per [`AddressKey`] as well as global. An IPv6 host usually owns a whole /64 and
//! can pick a fresh address in it for every connection, so IPv6 peers are counted by their
//! /64; an IPv4-mapped IPv6 address counts as the IPv4 address it carries.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The unit per-address limits count: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    /// The key `address` is counted under.
    pub fn of(address: IpAddr) -> AddressKey {
        match address {
            IpAddr::V4(v4) => AddressKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    AddressKey(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl std::fmt::Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Caps the handshakes in progress per [`AddressKey`]. A connection over the cap may wait
/// for a slot of its own address (it holds no global slot meanwhile), up to a bound of
/// waiters per address; beyond that it is turned away at once.
#[derive(Debug)]
pub struct HandshakeGate {
    per_address: usize,
    waiting_per_address: usize,
    addresses: Mutex<HashMap<AddressKey, AddressSlots>>,
}

#[derive(Debug)]
struct AddressSlots {
    slots: Arc<Semaphore>,
    /// Connections holding or waiting for one of `slots`; the entry goes with the last.
    users: usize,
    waiting: usize,
}

/// What [`HandshakeGate::enter`] decided.
#[derive(Debug)]
pub enum Entry {
    /// A slot is held; the handshake may go on.
    Admitted(HandshakeTicket),
    /// Every slot of this address is taken: wait with [`Waiting::admitted`].
    Wait(Waiting),
    /// Too many connections of this address wait already.
    Refused,
}

/// A slot of one address, released on drop.
#[derive(Debug)]
pub struct HandshakeTicket {
    _slot: OwnedSemaphorePermit,
    _user: AddressUser,
}

/// A connection waiting for a slot of its address.
#[derive(Debug)]
pub struct Waiting {
    slots: Arc<Semaphore>,
    user: AddressUser,
}

// Counts one connection in its address's entry while it lives.
#[derive(Debug)]
struct AddressUser {
    gate: Arc<HandshakeGate>,
    key: AddressKey,
    waiting: bool,
}

impl HandshakeGate {
    /// A gate allowing `per_address` handshakes in progress and `waiting_per_address`
    /// more waiting, per address.
    pub fn new(per_address: usize, waiting_per_address: usize) -> Arc<HandshakeGate> {
        Arc::new(HandshakeGate {
            per_address: per_address.max(1),
            waiting_per_address,
            addresses: Mutex::new(HashMap::new()),
        })
    }

    /// Admits, parks or refuses one new connection from `address`.
    pub fn enter(self: &Arc<Self>, address: IpAddr) -> Entry {
        let key = AddressKey::of(address);
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let entry = addresses.entry(key).or_insert_with(|| AddressSlots {
            slots: Arc::new(Semaphore::new(self.per_address)),
            users: 0,
            waiting: 0,
        });
        let slots = Arc::clone(&entry.slots);
        if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
            entry.users += 1;
            return Entry::Admitted(HandshakeTicket {
                _slot: slot,
                _user: AddressUser {
                    gate: Arc::clone(self),
                    key,
                    waiting: false,
                },
            });
        }
        if entry.waiting >= self.waiting_per_address {
            return Entry::Refused;
        }
        entry.users += 1;
        entry.waiting += 1;
        Entry::Wait(Waiting {
            slots,
            user: AddressUser {
                gate: Arc::clone(self),
                key,
                waiting: true,
            },
        })
    }

    /// Addresses with a handshake in progress or waiting (for tests and status).
    pub fn addresses_in_use(&self) -> usize {
        self.addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn leave(&self, key: AddressKey, was_waiting: bool) {
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = addresses.get_mut(&key) else {
            return;
        };
        if was_waiting {
            entry.waiting = entry.waiting.saturating_sub(1);
        }
        entry.users = entry.users.saturating_sub(1);
        if entry.users == 0 {
            addresses.remove(&key);
        }
    }

    fn stop_waiting(&self, key: AddressKey) {
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = addresses.get_mut(&key) {
            entry.waiting = entry.waiting.saturating_sub(1);
        }
    }
}

impl Waiting {
    /// Waits for a slot of this address (cancel-safe: dropping it gives up the place).
    pub async fn admitted(mut self) -> HandshakeTicket {
        // The semaphore is never closed.
        let slot = loop {
            if let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await {
                break slot;
            }
        };
        self.user.gate.stop_waiting(self.user.key);
        self.user.waiting = false;
        HandshakeTicket {
            _slot: slot,
            _user: self.user,
        }
    }
}

impl Drop for AddressUser {
    fn drop(&mut self) {
        self.gate.leave(self.key, self.waiting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            AddressKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddressKey::of(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(
            AddressKey::of(ip("2001:db8:1:2::1")),
            AddressKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddressKey::of(ip("::ffff:192.0.2.7")),
            AddressKey::of(ip("192.0.2.7"))
        );
        assert_eq!(
            AddressKey::of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(AddressKey::of(ip("192.0.2.7")).to_string(), "192.0.2.7");
    }

    #[tokio::test]
    async fn one_address_cannot_take_more_than_its_slots_and_waiters() {
        let gate = HandshakeGate::new(2, 1);
        let a = ip("10.0.0.1");
        let first = gate.enter(a);
        let second = gate.enter(a);
        assert!(matches!(first, Entry::Admitted(_)));
        assert!(matches!(second, Entry::Admitted(_)));
        let Entry::Wait(third) = gate.enter(a) else {
            panic!("the third connection should wait");
        };
        assert!(matches!(gate.enter(a), Entry::Refused));
        // Another address is not affected.
        assert!(matches!(gate.enter(ip("10.0.0.2")), Entry::Admitted(_)));
        // A freed slot goes to the waiter, and the waiting place is free again.
        drop(first);
        let ticket = tokio::time::timeout(std::time::Duration::from_secs(1), third.admitted())
            .await
            .expect("the waiter gets the freed slot");
        let Entry::Wait(fourth) = gate.enter(a) else {
            panic!("a place to wait is free again");
        };
        drop(fourth);
        drop((ticket, second));
        assert_eq!(
            gate.addresses_in_use(),
            0,
            "entries go with their last user"
        );
    }
}
