//! The life of one key's instance: the registry's one state machine. Every change of a key's
//! life is a [`Life::on`] call here, under the key's lock; it returns the one [`Action`] the
//! registry must carry out (spawn, deliver, restart after a delay, park, stop, forget). Only a
//! transition into `Starting` spawns, so a key never has two live instances; events of an
//! older generation are ignored.
//!
//! ```text
//!  Passive --arrived/activate--> Starting(g) --spawned--> Live(g)
//!     ^                            |  failed               | exited gracefully: Passive
//!     |                            v                       | (or Starting(g+1) if pending)
//!     +---- park ended ------- Parked(g) <-- over intensity -+ failed: Restarting(g)
//!                                                               --restart due--> Starting(g+1)
//!  any --stop--> Stopping(g) --exited--> Stopped;  Passive --retire--> Retired
//! ```

use std::time::Duration;

use crate::policy::{Backoff, Intensity, RestartWindow};

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It stopped itself for idleness.
    Passivated,
    /// Its key's range was released: it stopped gracefully and must not start again here.
    Released,
    /// Its handler, activation or replay failed (error or panic).
    Failed,
    /// It was killed (no graceful stop): counts as a failure.
    Killed,
}

impl Exit {
    fn graceful(self) -> bool {
        matches!(self, Exit::Passivated | Exit::Released)
    }
}

/// Where a key is, for callers that only look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Passive,
    Starting,
    Live,
    Restarting,
    Parked,
    Stopping,
    Stopped,
    Retired,
}

#[derive(Debug)]
enum Phase<H> {
    Passive,
    Starting {
        generation: u64,
    },
    Live {
        generation: u64,
        handle: H,
    },
    Restarting {
        generation: u64,
    },
    Parked {
        generation: u64,
    },
    /// Stopping the instance of `generation` (its handle once it is spawned).
    Stopping {
        generation: u64,
        handle: Option<H>,
    },
    Stopped,
    /// Forgotten by the registry: events go to the key's new entry.
    Retired,
}

/// What happened to a key.
#[derive(Debug, Clone)]
pub(crate) enum Event<H> {
    /// A message for the key became durable.
    Arrived,
    /// Someone asked for the key to run (activation, a parked key's retry).
    Activate,
    /// Generation `generation` spawned.
    Spawned { generation: u64, handle: H },
    /// Generation `generation` could not start.
    SpawnFailed { generation: u64 },
    /// Generation `generation` ended; `pending`: messages wait for it.
    Exited {
        generation: u64,
        exit: Exit,
        pending: bool,
    },
    /// A backoff delay of `generation` passed.
    RestartDue { generation: u64 },
    /// A parked key's window passed; `pending`: messages wait for it.
    ParkEnded { generation: u64, pending: bool },
    /// The registry stops.
    Stop,
    /// The registry forgets the (idle) key.
    Retire,
}

/// What the registry must do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action<H> {
    Nothing,
    /// Spawn generation `generation` of the key's instance.
    Spawn {
        generation: u64,
    },
    /// Hand the arrived message to the live instance.
    Deliver(H),
    /// Tell the instance just spawned to read what arrived while it started.
    Rescan(H),
    /// Send `RestartDue { generation }` after `delay`.
    RestartAfter {
        generation: u64,
        delay: Duration,
    },
    /// The key exceeded its restart intensity: send `ParkEnded { generation }` after `retry`.
    Park {
        generation: u64,
        retry: Duration,
    },
    /// Stop this instance gracefully.
    StopInstance(H),
    /// The key has no instance and nothing to do: the registry may forget it.
    Idle,
    /// The key was forgotten: give the event to its new entry.
    Reroute,
}

/// One key's life.
#[derive(Debug)]
pub(crate) struct Life<H> {
    phase: Phase<H>,
    generations: u64,
    window: RestartWindow,
}

impl<H: Clone> Life<H> {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Passive,
            generations: 0,
            window: RestartWindow::default(),
        }
    }

    pub(crate) fn state(&self) -> State {
        match self.phase {
            Phase::Passive => State::Passive,
            Phase::Starting { .. } => State::Starting,
            Phase::Live { .. } => State::Live,
            Phase::Restarting { .. } => State::Restarting,
            Phase::Parked { .. } => State::Parked,
            Phase::Stopping { .. } => State::Stopping,
            Phase::Stopped => State::Stopped,
            Phase::Retired => State::Retired,
        }
    }

    /// The live instance, if any.
    pub(crate) fn live(&self) -> Option<&H> {
        self.live_generation().map(|(h, _)| h)
    }

    /// The live instance and its generation, if any.
    pub(crate) fn live_generation(&self) -> Option<(&H, u64)> {
        match &self.phase {
            Phase::Live { handle, generation } => Some((handle, *generation)),
            _ => None,
        }
    }

    fn start(&mut self) -> Action<H> {
        self.generations += 1;
        let generation = self.generations;
        self.phase = Phase::Starting { generation };
        Action::Spawn { generation }
    }

    fn fail(&mut self, generation: u64, intensity: &Intensity, backoff: &Backoff) -> Action<H> {
        if self.window.allow(intensity) {
            self.phase = Phase::Restarting { generation };
            Action::RestartAfter {
                generation,
                delay: backoff.delay(self.window.recent()),
            }
        } else {
            self.phase = Phase::Parked { generation };
            Action::Park {
                generation,
                retry: Duration::from_millis(intensity.window_ms.max(1)),
            }
        }
    }

    /// The one transition function.
    pub(crate) fn on(
        &mut self,
        event: Event<H>,
        intensity: &Intensity,
        backoff: &Backoff,
    ) -> Action<H> {
        use Phase as P;
        if matches!(self.phase, P::Retired) {
            return match event {
                Event::Arrived | Event::Activate => Action::Reroute,
                _ => Action::Nothing,
            };
        }
        match (&mut self.phase, event) {
            (P::Passive, Event::Arrived | Event::Activate) => self.start(),
            (P::Passive, Event::Retire) => {
                self.phase = P::Retired;
                Action::Nothing
            }
            (P::Starting { generation: g }, Event::Spawned { generation, handle })
                if *g == generation =>
            {
                self.phase = P::Live {
                    generation,
                    handle: handle.clone(),
                };
                Action::Rescan(handle)
            }
            (P::Starting { generation: g }, Event::SpawnFailed { generation })
                if *g == generation =>
            {
                self.fail(generation, intensity, backoff)
            }
            (P::Live { handle, .. }, Event::Arrived) => Action::Deliver(handle.clone()),
            (
                P::Live { generation: g, .. } | P::Starting { generation: g },
                Event::Exited {
                    generation,
                    exit,
                    pending,
                },
            ) if *g == generation => {
                if exit.graceful() {
                    if pending && exit != Exit::Released {
                        self.start()
                    } else {
                        self.phase = P::Passive;
                        Action::Idle
                    }
                } else {
                    self.fail(generation, intensity, backoff)
                }
            }
            (P::Restarting { generation: g }, Event::RestartDue { generation })
                if *g == generation =>
            {
                self.start()
            }
            (
                P::Parked { generation: g },
                Event::ParkEnded {
                    generation,
                    pending,
                },
            ) if *g == generation => {
                if pending {
                    self.start()
                } else {
                    self.phase = P::Passive;
                    Action::Idle
                }
            }
            (P::Passive | P::Restarting { .. } | P::Parked { .. }, Event::Stop) => {
                self.phase = P::Stopped;
                Action::Nothing
            }
            (P::Starting { generation }, Event::Stop) => {
                self.phase = P::Stopping {
                    generation: *generation,
                    handle: None,
                };
                Action::Nothing
            }
            (P::Live { generation, handle }, Event::Stop) => {
                let handle = handle.clone();
                self.phase = P::Stopping {
                    generation: *generation,
                    handle: Some(handle.clone()),
                };
                Action::StopInstance(handle)
            }
            (
                P::Stopping {
                    generation: g,
                    handle: h @ None,
                },
                Event::Spawned { generation, handle },
            ) if *g == generation => {
                *h = Some(handle.clone());
                Action::StopInstance(handle)
            }
            (
                P::Stopping { generation: g, .. },
                Event::SpawnFailed { generation } | Event::Exited { generation, .. },
            ) if *g == generation => {
                self.phase = P::Stopped;
                Action::Nothing
            }
            // Everything else is a stale event (an older generation), an arrival that the
            // coming instance will read anyway, or one that waits out a backoff or a park.
            _ => Action::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INTENSITY: Intensity = Intensity {
        max_restarts: 2,
        window_ms: 1_000,
    };

    fn on(life: &mut Life<u32>, e: Event<u32>) -> Action<u32> {
        life.on(e, &INTENSITY, &Backoff::NONE)
    }

    #[test]
    fn an_arrival_starts_one_instance_and_later_arrivals_are_delivered() {
        let mut l = Life::new();
        assert_eq!(on(&mut l, Event::Arrived), Action::Spawn { generation: 1 });
        assert_eq!(
            on(&mut l, Event::Arrived),
            Action::Nothing,
            "no second spawn"
        );
        assert_eq!(
            on(
                &mut l,
                Event::Spawned {
                    generation: 1,
                    handle: 7
                }
            ),
            Action::Rescan(7)
        );
        assert_eq!(on(&mut l, Event::Arrived), Action::Deliver(7));
        assert_eq!(
            on(
                &mut l,
                Event::Exited {
                    generation: 1,
                    exit: Exit::Passivated,
                    pending: false
                }
            ),
            Action::Idle
        );
        assert_eq!(l.state(), State::Passive);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_restart_with_backoff_then_park_past_the_intensity() {
        let mut l = Life::new();
        on(&mut l, Event::Arrived);
        on(
            &mut l,
            Event::Spawned {
                generation: 1,
                handle: 1,
            },
        );
        let fail = |l: &mut Life<u32>, g| {
            on(
                l,
                Event::Exited {
                    generation: g,
                    exit: Exit::Failed,
                    pending: true,
                },
            )
        };
        assert!(matches!(
            fail(&mut l, 1),
            Action::RestartAfter { generation: 1, .. }
        ));
        assert_eq!(
            on(&mut l, Event::Arrived),
            Action::Nothing,
            "waits out its backoff"
        );
        assert_eq!(
            on(&mut l, Event::RestartDue { generation: 1 }),
            Action::Spawn { generation: 2 }
        );
        on(
            &mut l,
            Event::Spawned {
                generation: 2,
                handle: 2,
            },
        );
        assert!(matches!(fail(&mut l, 2), Action::RestartAfter { .. }));
        on(&mut l, Event::RestartDue { generation: 2 });
        on(
            &mut l,
            Event::Spawned {
                generation: 3,
                handle: 3,
            },
        );
        assert_eq!(
            fail(&mut l, 3),
            Action::Park {
                generation: 3,
                retry: Duration::from_millis(1_000)
            }
        );
        // A parked key does not restart on every arrival.
        for _ in 0..10 {
            assert_eq!(on(&mut l, Event::Arrived), Action::Nothing);
            assert_eq!(on(&mut l, Event::Activate), Action::Nothing);
        }
        assert_eq!(l.state(), State::Parked);
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(
            on(
                &mut l,
                Event::ParkEnded {
                    generation: 3,
                    pending: true
                }
            ),
            Action::Spawn { generation: 4 }
        );
        on(
            &mut l,
            Event::Spawned {
                generation: 4,
                handle: 4,
            },
        );
        assert!(
            matches!(fail(&mut l, 4), Action::RestartAfter { .. }),
            "the window has passed: restarts are allowed again"
        );
    }

    #[test]
    fn stale_events_of_an_older_generation_change_nothing() {
        let mut l = Life::new();
        on(&mut l, Event::Arrived);
        on(
            &mut l,
            Event::Spawned {
                generation: 1,
                handle: 1,
            },
        );
        on(
            &mut l,
            Event::Exited {
                generation: 1,
                exit: Exit::Killed,
                pending: true,
            },
        );
        on(&mut l, Event::RestartDue { generation: 1 });
        assert_eq!(
            on(
                &mut l,
                Event::Exited {
                    generation: 1,
                    exit: Exit::Failed,
                    pending: true
                }
            ),
            Action::Nothing
        );
        assert_eq!(
            on(
                &mut l,
                Event::Spawned {
                    generation: 1,
                    handle: 9
                }
            ),
            Action::Nothing
        );
        assert_eq!(l.state(), State::Starting);
    }

    #[test]
    fn stop_waits_for_a_starting_instance_and_stops_it() {
        let mut l = Life::new();
        on(&mut l, Event::Arrived);
        assert_eq!(on(&mut l, Event::Stop), Action::Nothing);
        assert_eq!(l.state(), State::Stopping);
        assert_eq!(
            on(
                &mut l,
                Event::Spawned {
                    generation: 1,
                    handle: 5
                }
            ),
            Action::StopInstance(5)
        );
        assert_eq!(on(&mut l, Event::Arrived), Action::Nothing);
        on(
            &mut l,
            Event::Exited {
                generation: 1,
                exit: Exit::Killed,
                pending: true,
            },
        );
        assert_eq!(l.state(), State::Stopped);
        assert_eq!(
            on(&mut l, Event::Arrived),
            Action::Nothing,
            "a stopped key starts nothing"
        );
    }

    #[test]
    fn a_retired_key_reroutes_arrivals() {
        let mut l: Life<u32> = Life::new();
        on(&mut l, Event::Retire);
        assert_eq!(on(&mut l, Event::Arrived), Action::Reroute);
        let mut busy = Life::new();
        on(&mut busy, Event::Arrived);
        on(&mut busy, Event::Retire);
        assert_eq!(busy.state(), State::Starting, "only a passive key retires");
    }

    fn event() -> impl Strategy<Value = Event<u32>> {
        let g = 1u64..6;
        prop_oneof![
            Just(Event::Arrived),
            Just(Event::Activate),
            g.clone().prop_map(|generation| Event::Spawned {
                generation,
                handle: generation as u32
            }),
            g.clone()
                .prop_map(|generation| Event::SpawnFailed { generation }),
            (g.clone(), 0..4u8, any::<bool>()).prop_map(|(generation, e, pending)| Event::Exited {
                generation,
                exit: [
                    Exit::Passivated,
                    Exit::Passivated,
                    Exit::Failed,
                    Exit::Killed
                ][e as usize],
                pending,
            }),
            g.clone()
                .prop_map(|generation| Event::RestartDue { generation }),
            (g, any::<bool>()).prop_map(|(generation, pending)| Event::ParkEnded {
                generation,
                pending
            }),
            Just(Event::Stop),
            Just(Event::Retire),
        ]
    }

    proptest! {
        /// Over any sequence of events: at most one instance is ever spawned and not yet
        /// ended, generations only grow, and nothing starts after a stop.
        #[test]
        fn never_two_instances_and_nothing_after_stop(events in proptest::collection::vec(event(), 0..60)) {
            let mut l = Life::new();
            let mut outstanding: Option<u64> = None; // spawned generation not yet ended
            let mut last_spawn = 0;
            let mut stopped = false;
            for e in events {
                let ended = match &e {
                    Event::SpawnFailed { generation } | Event::Exited { generation, .. } => Some(*generation),
                    _ => None,
                };
                if let Event::Stop = e { stopped = true; }
                let before = l.state();
                let action = on(&mut l, e);
                if let (Some(g), Some(o)) = (ended, outstanding) && g == o {
                    outstanding = None;
                }
                if let Action::Spawn { generation } = action {
                    prop_assert!(outstanding.is_none(), "spawned {generation} while {outstanding:?} runs (from {before:?})");
                    prop_assert!(generation > last_spawn);
                    prop_assert!(!stopped, "spawned after stop");
                    last_spawn = generation;
                    outstanding = Some(generation);
                }
            }
        }
    }
}
