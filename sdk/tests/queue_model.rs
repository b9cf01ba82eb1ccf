//! Model-based property test of the offline queue.
//!
//! Random sequences of appends, acks (stale, owed, forged), sends, rewinds,
//! reboots and, on flash, power loss or I/O errors in the middle of any of
//! them run against `OfflineQueue` over `MemoryStore` and
//! `FlashStore<MemFlash>`, and are checked against a plain reference model:
//!
//! - every appended record is still queued, acknowledged or counted as
//!   dropped, and `dropped_total` equals the model's count;
//! - sequence numbers strictly increase and are never reused, across reboots
//!   and failed operations;
//! - the send cursor hands out entries in order, never more than the window,
//!   never an acknowledged one, and everything unacknowledged again after a
//!   rewind or reboot;
//! - after a fault, an operation that returned `Ok` is durable, and one that
//!   failed either happened entirely or not at all (a failed append's record,
//!   if present, has the number it would have had).
//!
//! `PROPTEST_CASES` overrides the number of cases per test.

use std::cell::RefCell;
use std::collections::VecDeque;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use wildcam_sdk::queue::{
    Appended, Fault, FlashStore, FullPolicy, MemFlash, MemoryStore, OfflineQueue, OpKind, QueueConfig,
    QueueError, QueueStore,
};

const LEN: usize = 32;
const MEM_CAPACITY: usize = 6;
const PAGE: usize = 128;
/// Two metadata pages and three record pages.
const FLASH_SIZE: usize = 5 * PAGE;
const OPS_MAX: usize = 60;
const CASES_DEFAULT: u32 = 128;

type TestFlash = MemFlash<FLASH_SIZE, PAGE, 4>;
type Flash = FlashStore<TestFlash, LEN>;
type Mem = MemoryStore<MEM_CAPACITY, LEN>;

/// How to build, reboot and fault a store.
trait Kind {
    type S: QueueStore;
    /// True when the store's capacity is a record count the model can check.
    const EXACT_CAPACITY: bool;
    fn fresh() -> Self::S;
    /// Power cycle: a store rebuilt from what survived.
    fn reboot(store: Self::S) -> Self::S;
    fn arm(store: &mut Self::S, skip: u32, fault: Fault);
    /// Disarms; true if the fault hit.
    fn disarm(store: &mut Self::S) -> bool;
}

struct InMemory;

impl Kind for InMemory {
    type S = Mem;
    const EXACT_CAPACITY: bool = true;
    fn fresh() -> Mem {
        Mem::new()
    }
    fn reboot(store: Mem) -> Mem {
        store
    }
    fn arm(_: &mut Mem, _: u32, _: Fault) {
        unreachable!("no faults in RAM")
    }
    fn disarm(_: &mut Mem) -> bool {
        false
    }
}

struct OnFlash;

impl Kind for OnFlash {
    type S = Flash;
    const EXACT_CAPACITY: bool = false;
    fn fresh() -> Flash {
        Flash::new(TestFlash::new(), 0..FLASH_SIZE as u32).unwrap()
    }
    fn reboot(store: Flash) -> Flash {
        let mut flash = store.into_flash();
        flash.power_cycle();
        Flash::new(flash, 0..FLASH_SIZE as u32).unwrap()
    }
    fn arm(store: &mut Flash, skip: u32, fault: Fault) {
        store.flash_mut().fail_nth(OpKind::Mutation, skip, fault);
    }
    fn disarm(store: &mut Flash) -> bool {
        let hit = !store.flash().is_armed();
        store.flash_mut().disarm();
        hit
    }
}

/// An ack target, resolved against the model when it runs.
#[derive(Debug, Clone, Copy)]
enum AckPick {
    /// Below the floor.
    Stale(u32),
    /// The nth queued entry (wrapping).
    Owed(usize),
    /// At or past the next sequence number.
    Beyond(u32),
    /// `u32::MAX`.
    Max,
}

/// An operation that may be interrupted by a fault.
#[derive(Debug, Clone)]
enum Action {
    Append(Vec<u8>),
    Ack(AckPick),
    Send,
    Reboot,
}

#[derive(Debug, Clone)]
enum Op {
    Do(Action),
    Rewind,
    /// `action` with `fault` armed on the flash operation after `skip` more.
    Faulted {
        action: Action,
        skip: u32,
        fault: Fault,
    },
}

/// The reference model: what the queue must hold.
#[derive(Debug, Default)]
struct Model {
    entries: VecDeque<(u32, Vec<u8>)>,
    next_seq: u32,
    dropped: u32,
    /// Highest sequence number ever assigned or found stored.
    highest_seen: u32,
    /// Highest ack applied.
    acked: u32,
    /// Highest sequence number sent.
    highest_sent: u32,
    cursor: u32,
    inflight: usize,
}

impl Model {
    fn new() -> Self {
        Self { next_seq: 1, cursor: 1, ..Self::default() }
    }

    fn floor(&self) -> u32 {
        self.entries.front().map_or(self.next_seq, |(seq, _)| *seq)
    }

    fn resolve(&self, pick: AckPick) -> u32 {
        match pick {
            AckPick::Stale(back) => self.floor().saturating_sub(1).saturating_sub(back),
            AckPick::Owed(nth) => match self.entries.len() {
                0 => self.floor().saturating_sub(1),
                len => self.entries[nth % len].0,
            },
            AckPick::Beyond(ahead) => self.next_seq.saturating_add(ahead),
            AckPick::Max => u32::MAX,
        }
    }

    /// Removes the `count` oldest entries (acked or dropped).
    fn release(&mut self, count: usize) {
        self.entries.drain(..count);
        self.inflight = self.inflight.saturating_sub(count);
        self.cursor = self.cursor.max(self.floor());
    }

    fn rewind(&mut self) {
        self.cursor = self.floor();
        self.inflight = 0;
    }
}

/// How often the interesting paths ran, to show the test is not vacuous.
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    appended: u32,
    refused_full: u32,
    dropped: u32,
    released: u32,
    refused_forged: u32,
    sent: u32,
    resent_after_rewind: u32,
    reboots: u32,
    faults_hit: u32,
    failed_append_kept: u32,
    failed_append_lost: u32,
    failed_ack_applied: u32,
    failed_ack_void: u32,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.appended += other.appended;
        self.refused_full += other.refused_full;
        self.dropped += other.dropped;
        self.released += other.released;
        self.refused_forged += other.refused_forged;
        self.sent += other.sent;
        self.resent_after_rewind += other.resent_after_rewind;
        self.reboots += other.reboots;
        self.faults_hit += other.faults_hit;
        self.failed_append_kept += other.failed_append_kept;
        self.failed_append_lost += other.failed_append_lost;
        self.failed_ack_applied += other.failed_ack_applied;
        self.failed_ack_void += other.failed_ack_void;
    }
}

/// One test case: the queue under test and its model.
struct Run<K: Kind> {
    queue: OfflineQueue<K::S>,
    model: Model,
    config: QueueConfig,
    seen: Coverage,
}

/// A failure the model cannot predict: the operation may or may not have
/// taken effect.
struct Unsure;

impl<K: Kind> Run<K> {
    fn new(config: QueueConfig) -> Self {
        let queue = OfflineQueue::open_with(K::fresh(), config).unwrap();
        Self { queue, model: Model::new(), config, seen: Coverage::default() }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Do(action) => {
                assert!(self.act(action).is_ok(), "{action:?} failed without a fault");
            }
            Op::Rewind => {
                self.queue.rewind();
                self.model.rewind();
            }
            Op::Faulted { action, skip, fault } => self.faulted(action, *skip, *fault),
        }
        self.check_stats();
    }

    fn act(&mut self, action: &Action) -> Result<(), Unsure> {
        match action {
            Action::Append(record) => self.append(record),
            Action::Ack(pick) => self.ack(self.model.resolve(*pick)),
            Action::Send => self.send(),
            Action::Reboot => self.reboot(),
        }
    }

    fn faulted(&mut self, action: &Action, skip: u32, fault: Fault) {
        let through = match action {
            Action::Ack(pick) => self.model.resolve(*pick),
            _ => 0,
        };
        if let Action::Reboot = action {
            // The fault hits the recovery: arm it after the power cycle.
            self.power_cycle();
        }
        K::arm(self.queue.store_mut(), skip, fault);
        let outcome = match action {
            Action::Reboot => self.recover(),
            _ => self.act(action),
        };
        let hit = K::disarm(self.queue.store_mut());
        assert!(hit || outcome.is_ok(), "{action:?} failed without a fault");
        if !hit {
            return;
        }
        self.seen.faults_hit += 1;
        if matches!(fault, Fault::PowerLoss { .. }) {
            self.power_cycle();
        }
        match outcome {
            // It returned Ok: it must be durable, exactly as modelled.
            Ok(()) => self.check_contents(),
            Err(Unsure) => self.reconcile(action, through),
        }
    }

    fn append(&mut self, record: &[u8]) -> Result<(), Unsure> {
        let before = self.queue.stats();
        match self.queue.append(record) {
            Ok(done) => self.appended(record, done),
            Err(QueueError::RecordTooLarge) => assert!(record.len() > LEN),
            Err(QueueError::Full) => {
                assert_eq!(self.config.policy, FullPolicy::RejectNew);
                assert!(!K::EXACT_CAPACITY || self.model.entries.len() == MEM_CAPACITY);
                self.seen.refused_full += 1;
                assert_eq!(self.queue.stats(), before, "a refused append changed the queue");
            }
            Err(QueueError::Io | QueueError::Corrupted) => return Err(Unsure),
            Err(error) => panic!("append: {error:?}"),
        }
        Ok(())
    }

    fn appended(&mut self, record: &[u8], done: Appended) {
        let model = &mut self.model;
        assert!(record.len() <= LEN);
        assert_eq!(done.seq, model.next_seq);
        assert!(done.seq > model.highest_seen, "sequence number reused");
        let dropped = done.dropped as usize;
        if self.config.policy == FullPolicy::RejectNew {
            assert_eq!(dropped, 0);
        } else if K::EXACT_CAPACITY {
            assert_eq!(dropped, usize::from(model.entries.len() == MEM_CAPACITY));
        }
        assert!(dropped <= model.entries.len());
        let last_dropped = dropped.checked_sub(1).map(|last| model.entries[last].0);
        assert_eq!(done.dropped_oldest, last_dropped);
        model.dropped += done.dropped;
        model.release(dropped);
        model.entries.push_back((done.seq, record.to_vec()));
        model.next_seq = done.seq + 1;
        model.highest_seen = done.seq;
        self.seen.appended += 1;
        self.seen.dropped += done.dropped;
    }

    fn ack(&mut self, through: u32) -> Result<(), Unsure> {
        let outcome = self.queue.ack(through);
        let model = &mut self.model;
        if through >= model.next_seq {
            assert_eq!(outcome, Err(QueueError::AckBeyondAssigned), "forged ack {through}");
            self.seen.refused_forged += 1;
            return Ok(());
        }
        let released = match outcome {
            Ok(done) => done.released,
            Err(QueueError::Io | QueueError::Corrupted) => return Err(Unsure),
            Err(error) => panic!("ack {through}: {error:?}"),
        };
        let owed = model
            .entries
            .iter()
            .take_while(|(seq, _)| *seq <= through)
            .count();
        assert_eq!(released, owed, "ack {through}");
        self.seen.released += u32::try_from(owed).unwrap();
        model.release(owed);
        model.acked = model.acked.max(through);
        model.cursor = model.cursor.max(through + 1);
        Ok(())
    }

    fn send(&mut self) -> Result<(), Unsure> {
        let mut buf = [0; LEN];
        let got = match self.queue.next_to_send(&mut buf) {
            Ok(got) => got.map(|entry| (entry.seq, entry.record.to_vec())),
            Err(QueueError::Io | QueueError::Corrupted) => return Err(Unsure),
            Err(error) => panic!("send: {error:?}"),
        };
        let model = &mut self.model;
        let expected = if model.inflight < self.config.inflight_max {
            model
                .entries
                .iter()
                .find(|(seq, _)| *seq >= model.cursor)
                .cloned()
        } else {
            None
        };
        assert_eq!(got, expected, "send cursor");
        if let Some((seq, _)) = got {
            assert!(seq > model.acked, "acknowledged entry {seq} sent again");
            self.seen.sent += 1;
            if seq < model.highest_sent {
                self.seen.resent_after_rewind += 1;
            }
            model.highest_sent = model.highest_sent.max(seq);
            model.cursor = seq + 1;
            model.inflight += 1;
        }
        Ok(())
    }

    fn reboot(&mut self) -> Result<(), Unsure> {
        self.power_cycle();
        self.recover()
    }

    /// Reads the state back after a power cycle and checks it.
    fn recover(&mut self) -> Result<(), Unsure> {
        match self.queue.resync() {
            Ok(()) => self.check_contents(),
            Err(QueueError::Io | QueueError::Corrupted) => return Err(Unsure),
            Err(error) => panic!("recovery: {error:?}"),
        }
        Ok(())
    }

    /// Rebuilds the store from what survived and reopens the queue.
    fn power_cycle(&mut self) {
        self.seen.reboots += 1;
        let store =
            core::mem::replace(&mut self.queue, OfflineQueue::new(K::fresh(), self.config)).into_store();
        self.queue = OfflineQueue::new(K::reboot(store), self.config);
        self.model.rewind();
    }

    /// Everything queued, in order, read without moving the cursor.
    fn contents(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut found = Vec::new();
        let mut buf = [0; LEN];
        let mut from = 0;
        while let Some(entry) = self
            .queue
            .peek_from(from, &mut buf)
            .expect("reading after recovery")
        {
            found.push((entry.seq, entry.record.to_vec()));
            from = entry.seq + 1;
        }
        found
    }

    fn check_contents(&mut self) {
        let found = self.contents();
        assert!(found.iter().eq(self.model.entries.iter()), "queue holds {found:?}");
    }

    fn check_stats(&self) {
        if !self.queue.is_synced() {
            return;
        }
        let stats = self.queue.stats();
        let model = &self.model;
        assert_eq!(stats.next_seq, model.next_seq);
        assert_eq!(stats.len as usize, model.entries.len());
        assert_eq!(stats.floor, model.floor());
        assert_eq!(stats.oldest_unacked, model.entries.front().map(|(seq, _)| *seq));
        assert_eq!(stats.dropped_total, model.dropped);
        assert_eq!(stats.inflight as usize, model.inflight);
        assert!(stats.inflight as usize <= self.config.inflight_max);
    }

    /// After a failed `action`, checks that it happened entirely or not at
    /// all, and brings the model up to date.
    fn reconcile(&mut self, action: &Action, through: u32) {
        let mut found = self.contents();
        let stats = self.queue.stats();
        let model = &mut self.model;
        model.rewind();
        let mut appended = None;
        if let Action::Append(record) = action
            && found.last() == Some(&(model.next_seq, record.clone()))
        {
            appended = found.pop();
        }
        // What is left must be what the model holds, less some oldest.
        let gone = model
            .entries
            .len()
            .checked_sub(found.len())
            .expect("entries appeared");
        assert!(found.iter().eq(model.entries.iter().skip(gone)), "queue holds {found:?}");
        let dropped = stats
            .dropped_total
            .checked_sub(model.dropped)
            .expect("drop count went down");
        if let Action::Append(_) = action {
            if appended.is_some() {
                self.seen.failed_append_kept += 1;
            } else {
                self.seen.failed_append_lost += 1;
            }
        }
        match action {
            Action::Append(_) if self.config.policy == FullPolicy::DropOldest => {
                assert_eq!(dropped as usize, gone, "uncounted loss");
            }
            Action::Ack(_) => {
                assert_eq!(dropped, 0);
                let owed = model
                    .entries
                    .iter()
                    .take_while(|(seq, _)| *seq <= through)
                    .count();
                assert!(gone == 0 || gone == owed, "ack {through} half applied");
                if gone > 0 {
                    model.acked = model.acked.max(through);
                    self.seen.failed_ack_applied += 1;
                } else {
                    self.seen.failed_ack_void += 1;
                }
            }
            _ => assert_eq!((gone, dropped), (0, 0), "entries lost"),
        }
        model.dropped = stats.dropped_total;
        model.release(gone);
        if let Some(entry) = appended {
            model.highest_seen = entry.0;
            model.next_seq = entry.0 + 1;
            model.entries.push_back(entry);
        }
        assert_eq!(stats.next_seq, model.next_seq, "next sequence number");
        model.rewind();
    }
}

fn record() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![12 => vec(any::<u8>(), 0..=LEN), 1 => vec(any::<u8>(), LEN + 1..=LEN + 4)]
}

fn ack_pick() -> impl Strategy<Value = AckPick> {
    prop_oneof![
        1 => (0u32..3).prop_map(AckPick::Stale),
        5 => any::<usize>().prop_map(AckPick::Owed),
        1 => (0u32..3).prop_map(AckPick::Beyond),
        1 => Just(AckPick::Max),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => record().prop_map(Action::Append),
        3 => ack_pick().prop_map(Action::Ack),
        4 => Just(Action::Send),
        1 => Just(Action::Reboot),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => (0usize..3, any::<bool>()).prop_map(|(landed, torn)| Fault::PowerLoss { landed, torn }),
        1 => Just(Fault::PowerLoss { landed: usize::MAX, torn: false }),
        1 => Just(Fault::Error),
    ]
}

fn op(faults: bool) -> BoxedStrategy<Op> {
    let plain = prop_oneof![12 => action().prop_map(Op::Do), 1 => Just(Op::Rewind)];
    if !faults {
        return plain.boxed();
    }
    let faulted =
        (action(), 0u32..8, fault()).prop_map(|(action, skip, fault)| Op::Faulted { action, skip, fault });
    prop_oneof![4 => plain, 1 => faulted].boxed()
}

fn config() -> impl Strategy<Value = QueueConfig> {
    let policy = prop_oneof![Just(FullPolicy::RejectNew), Just(FullPolicy::DropOldest)];
    (policy, 1usize..=4).prop_map(|(policy, window)| QueueConfig::new(policy).with_inflight_max(window))
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES_DEFAULT)
}

fn run<K: Kind>(config: QueueConfig, ops: &[Op]) -> Coverage {
    let mut run = Run::<K>::new(config);
    for op in ops {
        run.step(op);
    }
    run.reboot().ok();
    run.check_stats();
    run.seen
}

/// Runs the generated cases (shrinking a failure to a minimal one) and
/// returns what they covered.
fn check<K: Kind>(faults: bool) -> Coverage {
    let config = ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config);
    let seen = RefCell::new(Coverage::default());
    let strategy = (self::config(), vec(op(faults), 1..=OPS_MAX));
    let result = runner.run(&strategy, |(config, ops)| {
        seen.borrow_mut().add(run::<K>(config, &ops));
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let seen = seen.into_inner();
    println!("{seen:?}");
    seen
}

/// With enough cases, every interesting path must have run.
fn enough_cases() -> bool {
    cases() >= 32
}

#[test]
fn memory_store_matches_the_model() {
    let seen = check::<InMemory>(false);
    if enough_cases() {
        assert!(seen.refused_full > 0 && seen.dropped > 0 && seen.resent_after_rewind > 0, "{seen:?}");
        assert!(seen.refused_forged > 0 && seen.released > 0 && seen.reboots > 0, "{seen:?}");
    }
}

#[test]
fn flash_store_matches_the_model() {
    let seen = check::<OnFlash>(true);
    if enough_cases() {
        assert!(seen.refused_full > 0 && seen.dropped > 0 && seen.resent_after_rewind > 0, "{seen:?}");
        assert!(seen.failed_append_kept > 0 && seen.failed_append_lost > 0, "{seen:?}");
        assert!(seen.failed_ack_applied > 0 && seen.failed_ack_void > 0, "{seen:?}");
    }
}
