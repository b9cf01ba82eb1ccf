//! Behaviour tests run over both stores, and flash power-loss sweeps.

use std::string::ToString;
use std::vec::Vec;

use super::*;

const LEN: usize = 16;
const PAGE: usize = 256;
const FLASH_PAGES: usize = 6;
const FLASH_SIZE: usize = FLASH_PAGES * PAGE;
const RANGE: core::ops::Range<u32> = 0..FLASH_SIZE as u32;

type Mem = MemoryStore<4, LEN>;
type TestFlash = MemFlash<FLASH_SIZE, PAGE, 4>;
type Flash = FlashStore<TestFlash, LEN>;

/// How to build and "reboot" a store.
trait Rig {
    type S: QueueStore;
    fn fresh() -> Self::S;
    fn reboot(store: Self::S) -> Self::S;
}

struct MemRig;

impl Rig for MemRig {
    type S = Mem;
    fn fresh() -> Mem {
        Mem::new()
    }
    fn reboot(store: Mem) -> Mem {
        store
    }
}

struct FlashRig;

impl Rig for FlashRig {
    type S = Flash;
    fn fresh() -> Flash {
        Flash::new(TestFlash::new(), RANGE).unwrap()
    }
    fn reboot(store: Flash) -> Flash {
        let mut flash = store.into_flash();
        flash.power_cycle();
        Flash::new(flash, RANGE).unwrap()
    }
}

fn open<R: Rig>(policy: FullPolicy) -> OfflineQueue<R::S> {
    OfflineQueue::open(R::fresh(), policy).unwrap()
}

fn reboot<R: Rig>(queue: OfflineQueue<R::S>) -> OfflineQueue<R::S> {
    let config = queue.config();
    OfflineQueue::open_with(R::reboot(queue.into_store()), config).unwrap()
}

/// A record that names its sequence number.
fn record(n: u32) -> [u8; 6] {
    let [a, b, c, d] = n.to_le_bytes();
    [0xD0, a, b, c, d, 0xE0]
}

fn contents<S: QueueStore>(queue: &mut OfflineQueue<S>) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = [0; LEN];
    let mut from = 0;
    while let Some(entry) = queue.peek_from(from, &mut buf).unwrap() {
        out.push((entry.seq, entry.record.to_vec()));
        from = entry.seq + 1;
    }
    out
}

fn expected(seqs: impl IntoIterator<Item = u32>) -> Vec<(u32, Vec<u8>)> {
    seqs.into_iter()
        .map(|seq| (seq, record(seq).to_vec()))
        .collect()
}

fn append_n<S: QueueStore>(queue: &mut OfflineQueue<S>, n: u32) {
    for _ in 0..n {
        let seq = queue.stats().next_seq;
        assert_eq!(queue.append(&record(seq)).unwrap().seq, seq);
    }
}

fn send<S: QueueStore>(queue: &mut OfflineQueue<S>) -> Option<u32> {
    let mut buf = [0; LEN];
    let entry = queue.next_to_send(&mut buf).unwrap()?;
    assert_eq!(entry.record, record(entry.seq));
    Some(entry.seq)
}

/// Appends until the store refuses; returns how many fit.
fn fill<S: QueueStore>(queue: &mut OfflineQueue<S>) -> u32 {
    for appended in 0..1000 {
        let seq = queue.stats().next_seq;
        match queue.append(&record(seq)) {
            Ok(done) => assert_eq!(done, Appended { seq, dropped: 0, dropped_oldest: None }),
            Err(QueueError::Full) => return appended,
            Err(error) => panic!("{error}"),
        }
    }
    panic!("never full");
}

fn sends_in_order_and_acks_release<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    assert!(queue.is_empty());
    assert_eq!(queue.floor(), 1);
    append_n(&mut queue, 3);
    assert_eq!(
        [send(&mut queue), send(&mut queue), send(&mut queue), send(&mut queue)],
        [Some(1), Some(2), Some(3), None]
    );
    assert_eq!(queue.ack(2), Ok(AckOutcome { released: 2 }));
    assert_eq!(queue.len(), 1);
    assert_eq!(queue.floor(), 3);
    assert_eq!(contents(&mut queue), expected([3]));
    assert_eq!(queue.ack(3), Ok(AckOutcome { released: 1 }));
    assert!(queue.is_empty());
    assert_eq!(queue.floor(), 4);
    assert_eq!(send(&mut queue), None);
}

fn stale_ack_is_a_no_op<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    assert_eq!(queue.ack(0), Ok(AckOutcome { released: 0 }));
    append_n(&mut queue, 3);
    queue.ack(2).unwrap();
    let before = queue.stats();
    for stale in [0, 1, 2] {
        assert_eq!(queue.ack(stale), Ok(AckOutcome { released: 0 }));
    }
    assert_eq!(queue.stats(), before);
    assert_eq!(contents(&mut queue), expected([3]));
}

fn ack_beyond_assigned_is_refused<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    assert_eq!(queue.ack(1), Err(QueueError::AckBeyondAssigned));
    append_n(&mut queue, 2);
    let before = queue.stats();
    for forged in [3, 4, u32::MAX] {
        assert_eq!(queue.ack(forged), Err(QueueError::AckBeyondAssigned));
    }
    assert_eq!(queue.stats(), before);
    assert_eq!(contents(&mut queue), expected([1, 2]));
    assert_eq!(queue.ack(2), Ok(AckOutcome { released: 2 }));
}

fn reboot_keeps_entries_and_sequence_numbers<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    append_n(&mut queue, 3);
    queue.ack(1).unwrap();
    let before = queue.stats();
    let mut queue = reboot::<R>(queue);
    assert_eq!(queue.stats(), QueueStats { inflight: 0, ..before });
    assert_eq!(contents(&mut queue), expected([2, 3]));
    assert_eq!(queue.append(&record(4)).unwrap().seq, 4);
    assert_eq!([send(&mut queue), send(&mut queue), send(&mut queue)], [Some(2), Some(3), Some(4)]);
}

fn empty_queue_reboot_keeps_next_sequence<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    append_n(&mut queue, 3);
    queue.ack(3).unwrap();
    let mut queue = reboot::<R>(reboot::<R>(queue));
    assert!(queue.is_empty());
    assert_eq!(queue.stats().next_seq, 4);
    assert_eq!(queue.floor(), 4);
    assert_eq!(queue.ack(3), Ok(AckOutcome { released: 0 }));
    assert_eq!(queue.ack(4), Err(QueueError::AckBeyondAssigned));
    assert_eq!(queue.append(&record(4)).unwrap().seq, 4);
}

fn full_reject_new<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    let capacity = fill(&mut queue);
    assert!(capacity >= 4);
    let before = queue.stats();
    assert_eq!(queue.append(b"late"), Err(QueueError::Full));
    assert_eq!(queue.stats(), before);
    assert_eq!(contents(&mut queue), expected(1..=capacity));
    // Room again after an ack, and no number was used by the refusals.
    queue.ack(capacity).unwrap();
    assert_eq!(queue.append(&record(capacity + 1)).unwrap().seq, capacity + 1);
}

fn full_drop_oldest_counted<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    let capacity = fill(&mut queue);
    let mut queue = OfflineQueue::open(queue.into_store(), FullPolicy::DropOldest).unwrap();
    let mut dropped = 0;
    for seq in capacity + 1..=2 * capacity {
        let done = queue.append(&record(seq)).unwrap();
        assert_eq!(done.seq, seq);
        dropped += done.dropped;
        // The oldest go first, so the highest dropped is the count.
        assert_eq!(done.dropped_oldest, (done.dropped > 0).then_some(dropped));
        assert_eq!(queue.floor(), dropped + 1);
    }
    assert!(dropped > 0);
    let stats = queue.stats();
    assert_eq!(stats.dropped_total, dropped);
    assert_eq!(stats.len + dropped, 2 * capacity);
    let mut queue = reboot::<R>(queue);
    assert_eq!(queue.stats().dropped_total, dropped);
    assert_eq!(contents(&mut queue), expected(dropped + 1..=2 * capacity));
    // Acking everything keeps the count and the numbering.
    queue.ack(2 * capacity).unwrap();
    let queue = reboot::<R>(queue);
    assert_eq!(queue.stats().dropped_total, dropped);
    assert_eq!(queue.stats().next_seq, 2 * capacity + 1);
}

fn server_behind_floor_after_unacknowledged_drops<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::DropOldest);
    assert!(!queue.server_behind_floor(), "a fresh queue owes nothing");
    append_n(&mut queue, 2);
    queue.ack(1).unwrap();
    assert!(!queue.server_behind_floor(), "floor 2, acked through 1");
    // The server stops acking; the full queue drops what it never got
    // (every store of the rigs holds fewer than 1,000 records).
    append_n(&mut queue, 1_000);
    assert!(queue.floor() > 2);
    assert!(queue.server_behind_floor());
    // An ack up to the floor (after the hello that announced it) settles it.
    queue.ack(queue.floor() - 1).unwrap();
    assert!(!queue.server_behind_floor());
    // After a reboot nothing is known to be acked until the first ack.
    let mut queue = reboot::<R>(queue);
    assert!(queue.server_behind_floor());
    queue.ack(queue.floor() - 1).unwrap();
    assert!(!queue.server_behind_floor());
}

fn inflight_window_and_rewind<R: Rig>() {
    let config = QueueConfig::new(FullPolicy::RejectNew).with_inflight_max(2);
    let mut queue = OfflineQueue::open_with(R::fresh(), config).unwrap();
    append_n(&mut queue, 4);
    assert_eq!([send(&mut queue), send(&mut queue), send(&mut queue)], [Some(1), Some(2), None]);
    assert_eq!(queue.inflight(), 2);
    queue.ack(1).unwrap();
    assert_eq!([send(&mut queue), send(&mut queue)], [Some(3), None]);
    // Reconnect: everything unacknowledged again, in order.
    queue.rewind();
    assert_eq!([send(&mut queue), send(&mut queue), send(&mut queue)], [Some(2), Some(3), None]);
    // An ack past the cursor (sent before a reboot) moves it on.
    queue.ack(3).unwrap();
    assert_eq!(queue.inflight(), 0);
    assert_eq!([send(&mut queue), send(&mut queue)], [Some(4), None]);
    queue.rewind();
    assert_eq!(send(&mut queue), Some(4));
}

fn ack_ahead_of_the_cursor<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    append_n(&mut queue, 4);
    assert_eq!(send(&mut queue), Some(1));
    assert_eq!(queue.ack(3), Ok(AckOutcome { released: 3 }));
    assert_eq!(queue.inflight(), 0);
    assert_eq!(send(&mut queue), Some(4));
}

fn refuses_oversized_records_and_short_buffers<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::DropOldest);
    assert_eq!(queue.append(&[7; LEN + 1]), Err(QueueError::RecordTooLarge));
    assert_eq!(queue.append(&[7; LEN]).unwrap().seq, 1);
    assert_eq!(queue.append(&[]).unwrap().seq, 2);
    let mut short = [0; LEN - 1];
    assert_eq!(queue.next_to_send(&mut short), Err(QueueError::BufferTooSmall));
    assert_eq!(queue.inflight(), 0);
    let mut buf = [0; LEN];
    assert_eq!(queue.next_to_send(&mut buf), Ok(Some(Entry { seq: 1, record: &[7; LEN] })));
    assert_eq!(queue.next_to_send(&mut buf), Ok(Some(Entry { seq: 2, record: &[] })));
    assert_eq!(queue.stats().next_seq, 3);
}

fn reports_fullness<R: Rig>() {
    let mut queue = open::<R>(FullPolicy::RejectNew);
    let empty = queue.fullness().unwrap();
    assert!(empty.capacity > 0);
    assert_eq!(empty.free, empty.capacity);
    append_n(&mut queue, 2);
    assert!(queue.fullness().unwrap().free <= empty.free);
    fill(&mut queue);
    assert_eq!(queue.fullness().unwrap(), Fullness { free: 0, ..empty });
}

macro_rules! over_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $name() { super::$name::<super::MemRig>() })*
        }
        mod flash {
            $(#[test] fn $name() { super::$name::<super::FlashRig>() })*
        }
    };
}

over_both_stores!(
    sends_in_order_and_acks_release,
    stale_ack_is_a_no_op,
    ack_beyond_assigned_is_refused,
    reboot_keeps_entries_and_sequence_numbers,
    empty_queue_reboot_keeps_next_sequence,
    full_reject_new,
    full_drop_oldest_counted,
    server_behind_floor_after_unacknowledged_drops,
    inflight_window_and_rewind,
    ack_ahead_of_the_cursor,
    refuses_oversized_records_and_short_buffers,
    reports_fullness,
);

#[test]
fn sequence_numbers_run_out_cleanly() {
    let mut store = Mem::new();
    store
        .save_meta(QueueMeta { floor: u32::MAX - 1, dropped_total: 0 })
        .unwrap();
    let mut queue = OfflineQueue::new(store, QueueConfig::new(FullPolicy::DropOldest));
    assert!(!queue.is_synced());
    assert_eq!(queue.append(b"last").map(|done| done.seq), Ok(u32::MAX - 1));
    assert!(queue.is_synced());
    assert_eq!(queue.append(b"none"), Err(QueueError::SequenceExhausted));
    assert_eq!(queue.ack(u32::MAX), Err(QueueError::AckBeyondAssigned));
    assert_eq!(queue.ack(u32::MAX - 1), Ok(AckOutcome { released: 1 }));
    assert_eq!(queue.stats().floor, u32::MAX);
}

#[test]
fn errors_display() {
    assert_eq!(QueueError::AckBeyondAssigned.to_string(), "ack beyond the highest sequence number assigned");
    assert_eq!(QueueError::from(StoreError::Io), QueueError::Io);
    assert_eq!(LayoutError::TooFewPages.to_string(), "queue flash range needs at least 4 pages");
    assert!(StoreError::Full.is_clean() && !StoreError::Io.is_clean());
}

#[test]
fn flash_layout_is_validated() {
    let layout =
        |range| Flash::new(TestFlash::new(), range).map(|store| (store.meta_range(), store.records_range()));
    assert_eq!(layout(RANGE), Ok((0..512, 512..1536)));
    assert_eq!(layout(0..1024), Ok((0..512, 512..1024)));
    assert_eq!(layout(0..768), Err(LayoutError::TooFewPages));
    assert_eq!(layout(1..1025), Err(LayoutError::NotPageAligned));
    assert_eq!(layout(0..2048), Err(LayoutError::OutOfBounds));
    let too_long = FlashStore::<TestFlash, 240>::new(TestFlash::new(), RANGE);
    assert_eq!(too_long.err(), Some(LayoutError::RecordTooLarge));
}

#[test]
fn esp32_geometry_holds_the_documented_record_count() {
    const SIZE: usize = 16 * 4096;
    let store = FlashStore::<_>::new(MemFlash::<SIZE>::new(), 0..SIZE as u32).unwrap();
    let mut queue = OfflineQueue::open(store, FullPolicy::RejectNew).unwrap();
    assert_eq!(queue.fullness().unwrap(), Fullness { free: 406, capacity: 406 });
    let mut stored = 0;
    while queue.append(&[0x5A; RECORD_LEN_MAX]).is_ok() {
        stored += 1;
    }
    assert_eq!(stored, 406);
    assert_eq!(queue.append(&[0x5A; RECORD_LEN_MAX]), Err(QueueError::Full));
    assert_eq!(queue.fullness().unwrap().free, 0);
}

#[test]
fn flash_io_error_resyncs_without_reusing_numbers() {
    let mut queue = open::<FlashRig>(FullPolicy::RejectNew);
    append_n(&mut queue, 2);
    // The header lands, the data write fails: the item is corrupt, skipped.
    queue
        .store_mut()
        .flash_mut()
        .fail_nth(OpKind::Write, 1, Fault::Error);
    assert_eq!(queue.append(&record(3)), Err(QueueError::Io));
    assert_eq!(queue.store().last_io_error(), Some(embedded_storage::nor_flash::NorFlashErrorKind::Other));
    assert_eq!(queue.append(&record(3)).unwrap().seq, 3);
    assert_eq!(contents(&mut queue), expected([1, 2, 3]));
    let mut queue = reboot::<FlashRig>(queue);
    assert_eq!(contents(&mut queue), expected([1, 2, 3]));
    assert_eq!(queue.stats().next_seq, 4);
}

/// What a power-loss sweep does to the queue under test.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Append,
    Ack(u32),
}

/// Builds a queue with history: entries 3..=6 owed, 1..=2 acked, and for
/// `DropOldest` a full store.
fn prepared(policy: FullPolicy) -> (OfflineQueue<Flash>, u32) {
    let mut queue = open::<FlashRig>(FullPolicy::RejectNew);
    append_n(&mut queue, 6);
    queue.ack(2).unwrap();
    let last = match policy {
        FullPolicy::RejectNew => 6,
        FullPolicy::DropOldest => 6 + fill(&mut queue),
    };
    let queue = OfflineQueue::open(queue.into_store(), policy).unwrap();
    (queue, last)
}

/// Cuts power at every mutating flash operation of `victim` in turn (with
/// and without torn words/pages and with the operation fully landed), then
/// checks the reopened queue. Returns how many operations were cut.
fn power_loss_sweep(policy: FullPolicy, victim: Victim) -> u32 {
    for skip in 0.. {
        let mut hit = false;
        for (landed, torn) in [(0, false), (0, true), (1, true), (usize::MAX, false)] {
            let (mut queue, last) = prepared(policy);
            let before = queue.stats();
            let fault = Fault::PowerLoss { landed, torn };
            queue
                .store_mut()
                .flash_mut()
                .fail_nth(OpKind::Mutation, skip, fault);
            let outcome = match victim {
                Victim::Append => queue.append(&record(last + 1)).map(|done| done.seq),
                Victim::Ack(through) => queue.ack(through).map(|done| done.released as u32),
            };
            if queue.store().flash().is_armed() {
                // The operation finished before the fault: the sweep is over.
                assert!(outcome.is_ok());
                std::println!("{victim:?} {policy:?}: {skip} flash operations cut");
                return skip;
            }
            hit = true;
            let queue = reboot_after_loss(queue, policy);
            check_after_loss(queue, victim, before, last, outcome.is_ok());
        }
        assert!(hit);
    }
    unreachable!()
}

fn reboot_after_loss(queue: OfflineQueue<Flash>, policy: FullPolicy) -> OfflineQueue<Flash> {
    let store = FlashRig::reboot(queue.into_store());
    OfflineQueue::open(store, policy).unwrap()
}

fn check_after_loss(mut queue: OfflineQueue<Flash>, victim: Victim, before: QueueStats, last: u32, ok: bool) {
    let stats = queue.stats();
    let found = contents(&mut queue);
    match victim {
        Victim::Append => {
            let new = last + 1;
            let present = found.last().is_some_and(|(seq, _)| *seq == new);
            assert!(present || !ok, "acknowledged append lost");
            let dropped = stats.dropped_total - before.dropped_total;
            let first = before.floor + dropped;
            let survivors = if present { first..=new } else { first..=last };
            assert_eq!(found, expected(survivors), "dropped {dropped}");
            assert_eq!(stats.next_seq, if present { new + 1 } else { new });
        }
        Victim::Ack(through) => {
            let released = stats.floor == through + 1;
            assert!(released || (!ok && stats.floor == before.floor), "{stats:?}");
            assert_eq!(found, expected(stats.floor..=last));
            assert_eq!(stats.next_seq, before.next_seq);
        }
    }
    if !matches!(victim, Victim::Append) {
        assert_eq!(stats.dropped_total, before.dropped_total);
    }
    // The queue keeps working, with fresh numbers.
    let next = stats.next_seq;
    assert_eq!(queue.append(b"after").map(|done| done.seq), Ok(next));
}

#[test]
fn power_loss_during_append() {
    assert!(power_loss_sweep(FullPolicy::RejectNew, Victim::Append) >= 3);
}

#[test]
fn power_loss_during_append_that_drops() {
    assert!(power_loss_sweep(FullPolicy::DropOldest, Victim::Append) >= 10);
}

#[test]
fn power_loss_during_ack() {
    assert!(power_loss_sweep(FullPolicy::RejectNew, Victim::Ack(5)) >= 5);
}

fn reopen(flash: &mut TestFlash) -> Result<OfflineQueue<FlashStore<&mut TestFlash, LEN>>, QueueError> {
    OfflineQueue::open(FlashStore::new(flash, RANGE).unwrap(), FullPolicy::RejectNew)
}

#[test]
fn power_loss_while_open_finishes_an_interrupted_ack() {
    for skip in 0.. {
        let mut flash = TestFlash::new();
        {
            let mut queue = reopen(&mut flash).unwrap();
            append_n(&mut queue, 6);
            // An ack of 4 whose commit landed but whose removals did not.
            queue
                .store_mut()
                .save_meta(QueueMeta { floor: 5, dropped_total: 0 })
                .unwrap();
        }
        flash.fail_nth(OpKind::Mutation, skip, Fault::PowerLoss { landed: 0, torn: skip % 2 == 0 });
        let opened = reopen(&mut flash).map(|queue| queue.stats());
        let finished = flash.is_armed();
        flash.power_cycle();
        let mut queue = reopen(&mut flash).unwrap();
        assert_eq!(contents(&mut queue), expected(5..=6));
        assert_eq!(queue.stats().next_seq, 7);
        if finished {
            assert_eq!(opened.map(|stats| stats.floor), Ok(5));
            assert!(skip > 0, "open did not write");
            break;
        }
    }
}

#[test]
fn append_with_hands_the_encoder_its_sequence() {
    let mut queue = OfflineQueue::open(Mem::new(), FullPolicy::RejectNew).unwrap();
    for expected in 1..=3u32 {
        let appended = queue
            .append_with(|seq, buf| {
                assert_eq!(buf.len(), LEN, "the buffer is the store's record limit");
                buf[..4].copy_from_slice(&seq.to_le_bytes());
                Some(4)
            })
            .unwrap();
        assert_eq!(appended.seq, expected);
    }
    let mut buf = [0u8; LEN];
    let entry = queue.next_to_send(&mut buf).unwrap().unwrap();
    assert_eq!(entry.record, 1u32.to_le_bytes());
    // A failing encoder appends nothing and uses no number.
    assert_eq!(queue.append_with(|_, _| None).map(|a| a.seq), Err(QueueError::RecordEncode));
    assert_eq!(queue.append_with(|_, _| Some(LEN + 1)).map(|a| a.seq), Err(QueueError::RecordEncode));
    assert_eq!(queue.stats().next_seq, 4);
    assert_eq!(queue.len(), 3);
}
