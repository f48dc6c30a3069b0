//! One key's unacknowledged messages, in seq order: where each payload is (and the payload
//! itself while it is held in memory).
//!
//! Messages of a closed segment that has an index file come in whole runs (`Span`s): the run
//! the sidecar lists is kept as it was read, so recovering a segment from its sidecar costs
//! one entry per key, not one per message. Everything appended or read record by record after
//! them is one [`Pending`] per message. Spans always come before single messages: recovery
//! indexes the sidecar segments first, and appends go at the end.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::journal::Seq;

/// One message of the queue.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) seq: Seq,
    pub(super) segment: u64,
    /// Where the payload is in its segment.
    pub(super) offset: u64,
    pub(super) len: u32,
    /// The payload, while it is held in memory (appended by this process, range owned).
    /// Boxed to keep the entry small: recovery indexes millions of these, none in memory.
    pub(super) memory: Option<Box<Bytes>>,
}

/// Messages `first + start ..` of one key in one closed segment, as its sidecar lists them.
#[derive(Debug)]
struct Span {
    segment: u64,
    /// The seq of `at[0]`; the others follow one by one.
    first: Seq,
    /// (payload offset, payload length) of each message.
    at: Vec<(u32, u32)>,
    /// Messages before this one are acknowledged.
    start: usize,
}

impl Span {
    fn first_live(&self) -> Seq {
        self.first + self.start as u64
    }

    fn last(&self) -> Seq {
        self.first + self.at.len() as u64 - 1
    }

    fn slot(&self, i: usize) -> Slot<'_> {
        let (offset, len) = self.at[i];
        Slot {
            seq: self.first + i as u64,
            segment: self.segment,
            offset: u64::from(offset),
            len,
            memory: None,
        }
    }
}

/// Where one message of the queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot<'a> {
    pub(super) seq: Seq,
    pub(super) segment: u64,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) memory: Option<&'a Bytes>,
}

impl<'a> From<&'a Pending> for Slot<'a> {
    fn from(p: &'a Pending) -> Self {
        Slot {
            seq: p.seq,
            segment: p.segment,
            offset: p.offset,
            len: p.len,
            memory: p.memory.as_deref(),
        }
    }
}

/// A key's unacknowledged messages, in seq order.
#[derive(Debug, Default)]
pub(super) struct Queue {
    spans: VecDeque<Span>,
    tail: VecDeque<Pending>,
    /// Messages in `spans`.
    in_spans: usize,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.in_spans + self.tail.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room for `n` more single messages.
    pub(super) fn reserve(&mut self, n: usize) {
        self.tail.reserve_exact(n);
    }

    /// Single messages held (what [`Queue::reserve`] sizes).
    pub(super) fn singles(&self) -> usize {
        self.tail.len()
    }

    /// Adds a message after every other (its seq after theirs).
    pub(super) fn push_back(&mut self, p: Pending) {
        debug_assert!(self.back_seq().is_none_or(|last| last < p.seq));
        self.tail.push_back(p);
    }

    /// Adds the messages `first + start ..` of a sidecar's run in `segment`. Only before any
    /// single message, and after every other span's seqs.
    pub(super) fn push_span(
        &mut self,
        segment: u64,
        first: Seq,
        at: Vec<(u32, u32)>,
        start: usize,
    ) {
        debug_assert!(self.tail.is_empty());
        if start >= at.len() {
            return;
        }
        let span = Span {
            segment,
            first,
            at,
            start,
        };
        debug_assert!(self.back_seq().is_none_or(|last| last < span.first_live()));
        self.in_spans += span.at.len() - start;
        self.spans.push_back(span);
    }

    /// The seq of the last message.
    pub(super) fn back_seq(&self) -> Option<Seq> {
        match self.tail.back() {
            Some(p) => Some(p.seq),
            None => self.spans.back().map(Span::last),
        }
    }

    /// The messages with `seq >= from`, in order.
    pub(super) fn from(&self, from: Seq) -> impl Iterator<Item = Slot<'_>> {
        let span_at = self.spans.partition_point(|s| s.last() < from);
        let in_spans = self.spans.range(span_at..).flat_map(move |s| {
            let skip = from.saturating_sub(s.first).min(s.at.len() as u64) as usize;
            (skip.max(s.start)..s.at.len()).map(|i| s.slot(i))
        });
        let tail_at = self.tail.partition_point(|p| p.seq < from);
        in_spans.chain(self.tail.range(tail_at..).map(Slot::from))
    }

    /// The message `seq`, if it is in the queue.
    pub(super) fn get(&self, seq: Seq) -> Option<Slot<'_>> {
        self.from(seq).next().filter(|s| s.seq == seq)
    }

    /// Drops the messages with `seq <= upto`; `dropped(segment, count, bytes in memory)` is
    /// told of each segment's share, in order.
    pub(super) fn pop_upto(&mut self, upto: Seq, mut dropped: impl FnMut(u64, u64, u64)) {
        while let Some(span) = self.spans.front_mut() {
            if span.first_live() > upto {
                return;
            }
            let end = if span.last() <= upto {
                span.at.len()
            } else {
                (upto - span.first + 1) as usize
            };
            let n = end - span.start;
            self.in_spans -= n;
            dropped(span.segment, n as u64, 0);
            span.start = end;
            if end < span.at.len() {
                return;
            }
            self.spans.pop_front();
        }
        while self.tail.front().is_some_and(|p| p.seq <= upto) {
            let Some(p) = self.tail.pop_front() else {
                break;
            };
            let bytes = if p.memory.is_some() {
                u64::from(p.len)
            } else {
                0
            };
            dropped(p.segment, 1, bytes);
        }
    }

    /// Drops every payload held in memory (read back from its segment when needed); returns
    /// the bytes freed.
    pub(super) fn forget_memory(&mut self) -> u64 {
        let mut freed = 0;
        for p in self.tail.iter_mut() {
            if p.memory.take().is_some() {
                freed += u64::from(p.len);
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the queue must behave as: one entry per message.
    #[derive(Default)]
    struct Model(VecDeque<(Seq, u64, u64, u32, bool)>);

    #[derive(Debug, Clone)]
    enum Op {
        Span { len: usize, start: usize },
        Push { memory: bool },
        Ack(u64),
        Forget,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..6, 0usize..7).prop_map(|(len, start)| Op::Span { len, start }),
            any::<bool>().prop_map(|memory| Op::Push { memory }),
            (0u64..8).prop_map(Op::Ack),
            Just(Op::Forget),
        ]
    }

    proptest! {
        /// Every read of the queue equals the one-entry-per-message model's, whatever mix of
        /// spans, single messages, acknowledgements and forgets came before.
        #[test]
        fn queue_reads_as_one_entry_per_message(ops in proptest::collection::vec(op(), 0..40)) {
            let (mut q, mut model) = (Queue::default(), Model::default());
            let mut next: Seq = 1;
            let mut segment = 1u64;
            for op in ops {
                match op {
                    Op::Span { len, start } if q.singles() == 0 => {
                        let at: Vec<(u32, u32)> =
                            (0..len).map(|i| (next as u32 * 10, i as u32 + 1)).collect();
                        for (i, &(off, l)) in at.iter().enumerate().skip(start) {
                            model.0.push_back((next + i as u64, segment, u64::from(off), l, false));
                        }
                        q.push_span(segment, next, at, start);
                        next += len as u64;
                        segment += 1;
                    }
                    Op::Span { .. } => {}
                    Op::Push { memory } => {
                        let payload = memory.then(|| Box::new(Bytes::from(vec![7u8; 3])));
                        q.push_back(Pending { seq: next, segment, offset: next * 3, len: 3, memory: payload });
                        model.0.push_back((next, segment, next * 3, 3, memory));
                        next += 1;
                    }
                    Op::Ack(back) => {
                        let upto = next.saturating_sub(back);
                        let mut counted = Vec::new();
                        q.pop_upto(upto, |seg, n, bytes| counted.push((seg, n, bytes)));
                        let mut expected: Vec<(u64, u64, u64)> = Vec::new();
                        while model.0.front().is_some_and(|m| m.0 <= upto) {
                            let Some(m) = model.0.pop_front() else { break };
                            let bytes = if m.4 { u64::from(m.3) } else { 0 };
                            expected.push((m.1, 1, bytes));
                        }
                        // Per segment: messages and bytes in memory dropped.
                        let by_segment = |v: &[(u64, u64, u64)]| {
                            let mut m = std::collections::BTreeMap::<u64, (u64, u64)>::new();
                            for &(seg, n, bytes) in v {
                                let e = m.entry(seg).or_default();
                                e.0 += n;
                                e.1 += bytes;
                            }
                            m
                        };
                        prop_assert_eq!(by_segment(&counted), by_segment(&expected));
                    }
                    Op::Forget => {
                        let freed = q.forget_memory();
                        let mut expected = 0;
                        for m in model.0.iter_mut() {
                            if std::mem::take(&mut m.4) {
                                expected += u64::from(m.3);
                            }
                        }
                        prop_assert_eq!(freed, expected);
                    }
                }
                prop_assert_eq!(q.len(), model.0.len());
                prop_assert_eq!(q.back_seq(), model.0.back().map(|m| m.0));
                for from in 0..next + 1 {
                    let got: Vec<_> = q.from(from).map(|s| (s.seq, s.segment, s.offset, s.len, s.memory.is_some())).collect();
                    let want: Vec<_> = model.0.iter().filter(|m| m.0 >= from).copied().collect();
                    prop_assert_eq!(&got, &want);
                    let one = q.get(from).map(|s| s.seq);
                    prop_assert_eq!(one, model.0.iter().find(|m| m.0 == from).map(|m| m.0));
                }
            }
        }
    }
}
