//! The engine's own worker threads: a loop is split across them in about a microsecond.
//!
//! A general-purpose pool puts its idle workers to sleep, and waking one costs 50–100 µs
//! on a small virtual machine: more than most operators of a model take. So while a
//! model runs, from its first loop large enough to split ([`Team::run`], [`Team::hot`]),
//! the workers spin on a shared counter and pick up each loop as soon as it is published;
//! after a run they spin a little longer, then sleep. A model with no such loop never
//! wakes them.
//! The thread that calls [`Team::for_each`] always takes part, so a loop never waits for
//! a worker that is still asleep: the worker joins when it wakes, or finds the loop done.
//!
//! One loop runs at a time. A loop started while another runs (a second request, or a
//! loop inside a task) runs on its calling thread alone.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long a worker spins after its last loop, outside a run, before it sleeps.
const IDLE_SPIN: Duration = Duration::from_micros(200);

/// A loop's body as the workers see it: called once per thread that takes part, with
/// that thread's place in the team (the caller is 0).
type Body<'a> = dyn Fn(usize) + Sync + 'a;

/// The tasks of one thread's share of a loop, `next .. end`, on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Share {
    next: AtomicUsize,
    end: AtomicUsize,
}

/// What the caller of a loop and the workers share.
struct Shared {
    /// `2 * loop number + 1` while a loop is open to workers, even when none is.
    state: AtomicU64,
    /// The open loop's body (a `*const &Body`), valid while `state` is odd.
    body: AtomicPtr<&'static Body<'static>>,
    /// Each thread's share of the open loop's tasks: thread `t` of `n` starts on the `t`-th
    /// contiguous `1/n` of them, so a thread works on the same part of every loop over the
    /// same tensors and finds it in its own cache. A thread done with its share takes
    /// tasks from the others'.
    shares: Vec<Share>,
    /// Workers inside the open loop's body; the caller waits for none before it returns.
    inside: AtomicUsize,
    /// Runs in progress: workers spin instead of sleeping.
    hot: AtomicUsize,
    /// Set while a loop is in progress: a second one runs on its caller alone.
    busy: AtomicBool,
    /// A task on a worker panicked; the caller panics in turn.
    panicked: AtomicBool,
    /// Workers asleep, and what wakes them.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Set when the team is dropped: its workers exit.
    stop: AtomicBool,
}

/// A fixed set of worker threads that loops are split across; see the module docs.
pub(crate) struct Team {
    shared: Arc<Shared>,
    threads: usize,
    workers: Vec<thread::JoinHandle<()>>,
    /// Split every loop, however small (tests of the split paths).
    split_everything: bool,
}

thread_local! {
    /// The team this thread's loops use instead of the global one (tests).
    static CURRENT: Cell<Option<*const Team>> = const { Cell::new(None) };
    /// `Some` while this thread is inside a model run ([`Team::run`]); it holds the
    /// team's [`Hot`] from the run's first loop worth splitting to the run's end.
    static RUN: RefCell<Option<Option<Hot>>> = const { RefCell::new(None) };
}

impl Team {
    /// A team of `threads` threads in all: the caller of each loop and `threads - 1`
    /// workers, started now.
    pub(crate) fn new(threads: usize) -> Team {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            body: AtomicPtr::new(std::ptr::null_mut()),
            shares: (0..threads).map(|_| Share::default()).collect(),
            inside: AtomicUsize::new(0),
            hot: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let workers = (1..threads)
            .filter_map(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("engine-{i}"))
                    .spawn(move || work(&shared, i))
                    .ok()
            })
            .collect::<Vec<_>>();
        Team { shared, threads: workers.len() + 1, workers, split_everything: false }
    }

    /// This team, splitting every loop whatever its size while a run keeps it hot, so
    /// that tests on small tensors take the paths large ones do.
    #[cfg(test)]
    pub(crate) fn splitting_everything(mut self) -> Team {
        self.split_everything = true;
        self
    }

    /// The team loops on this thread use: the process's own, sized by `RAYON_NUM_THREADS`
    /// (as candle-core's matmul is) or else by the CPUs available, unless a test installed
    /// another with [`Team::install`].
    pub(crate) fn current<T>(f: impl FnOnce(&Team) -> T) -> T {
        match CURRENT.with(Cell::get) {
            // SAFETY: `install` sets the pointer only for the length of its call, during
            // which the team it points to is borrowed and alive.
            Some(team) => f(unsafe { &*team }),
            None => f(global()),
        }
    }

    /// Runs `f` with this team as the current one on this thread.
    #[cfg(test)]
    pub(crate) fn install<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<*const Team>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self as *const Team))));
        f()
    }

    /// Threads a loop is split across, the caller included.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Whether a loop of `work` is worth splitting, where `min_work` is the least that
    /// pays for the hand-off: only while the workers are kept awake ([`Team::hot`]). Inside
    /// a model run ([`Team::run`]) the first such loop makes the team hot for the rest of
    /// the run, so a model none of whose loops is split never wakes a worker (a small one
    /// is faster on one thread than with a worker woken for it).
    pub(crate) fn worth_splitting(&self, work: usize, min_work: usize) -> bool {
        if self.threads <= 1 || (work < min_work && !self.split_everything) {
            return false;
        }
        if self.shared.hot.load(Relaxed) > 0 {
            return true;
        }
        RUN.with(|run| match &mut *run.borrow_mut() {
            Some(hot @ None) => {
                *hot = Some(self.hot());
                true
            }
            _ => false,
        })
    }

    /// Marks a model run on this thread until the guard is dropped: its first loop worth
    /// splitting makes the team hot ([`Team::hot`]) until then.
    pub(crate) fn run(&self) -> Run {
        Run { outer: RUN.with(|run| run.replace(Some(None))) }
    }

    /// Keeps the workers spinning until the guard is dropped: held for a model run, so
    /// each of its loops starts on workers that are already awake.
    pub(crate) fn hot(&self) -> Hot {
        self.shared.hot.fetch_add(1, SeqCst);
        self.shared.wake_sleepers();
        Hot { shared: Arc::clone(&self.shared) }
    }

    /// Calls `task(i)` for every `i` in `0..tasks`, across the team's threads, and returns
    /// when all have returned. Each thread that takes part builds its own scratch state
    /// with `init` before its first task.
    ///
    /// # Panics
    ///
    /// If a task panics, after every task has ended.
    pub(crate) fn for_each_init<S>(
        &self,
        tasks: usize,
        init: impl Fn() -> S + Sync,
        task: impl Fn(&mut S, usize) + Sync,
    ) {
        if tasks <= 1 || self.workers.is_empty() || self.shared.busy.swap(true, Acquire) {
            let mut state = init();
            (0..tasks).for_each(|i| task(&mut state, i));
            return;
        }
        let shares = &self.shared.shares;
        let body = |me: usize| {
            let mut state = None;
            // Its own share first, then what is left of the others'.
            for share in shares.iter().cycle().skip(me).take(shares.len()) {
                let end = share.end.load(Relaxed);
                while share.next.load(Relaxed) < end {
                    let i = share.next.fetch_add(1, Relaxed);
                    if i >= end {
                        break;
                    }
                    task(state.get_or_insert_with(&init), i);
                }
            }
        };
        let body: &Body<'_> = &body;
        // SAFETY: only the lifetime is erased. `Open` closes the loop and waits until no
        // worker is inside the body before this frame (which owns the body) is left,
        // whether the tasks return or unwind.
        let body: &'static Body<'static> = unsafe { std::mem::transmute(body) };
        let open = Open::new(&self.shared, &body, tasks);
        body(0);
        drop(open);
        if self.shared.panicked.swap(false, AcqRel) {
            panic!("a task of a parallel loop panicked on a worker thread");
        }
    }

    /// Calls `task(scratch, i, piece)` for every `chunk`-sized piece `i` of `out` (the last
    /// may be shorter), across the team's threads, as [`Team::for_each_init`] does.
    pub(crate) fn chunks_init<T: Send, S>(
        &self,
        out: &mut [T],
        chunk: usize,
        init: impl Fn() -> S + Sync,
        task: impl Fn(&mut S, usize, &mut [T]) + Sync,
    ) {
        let len = out.len();
        if chunk == 0 || len == 0 {
            return;
        }
        // An address, not a pointer, so the closure is Sync; each task rebuilds its piece.
        let base = out.as_mut_ptr() as usize;
        self.for_each_init(len.div_ceil(chunk), init, |scratch, i| {
            let start = i * chunk;
            let width = chunk.min(len - start);
            // SAFETY: task indices are distinct and below `len / chunk` rounded up, so the
            // pieces are disjoint and within `out`, which this call borrows mutably.
            let piece =
                unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), width) };
            task(scratch, i, piece);
        });
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.wake_sleepers();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A loop open to the workers; dropping it closes the loop and waits for them to leave.
struct Open<'a> {
    shared: &'a Shared,
}

impl<'a> Open<'a> {
    fn new(shared: &'a Shared, body: &&'static Body<'static>, tasks: usize) -> Open<'a> {
        let threads = shared.shares.len();
        for (t, share) in shared.shares.iter().enumerate() {
            share.next.store(tasks * t / threads, Relaxed);
            share.end.store(tasks * (t + 1) / threads, Relaxed);
        }
        shared.panicked.store(false, Relaxed);
        shared.body.store(body as *const _ as *mut _, Relaxed);
        // Odd: open. Every earlier write is visible to a worker that sees this state.
        shared.state.fetch_add(1, SeqCst);
        shared.wake_sleepers();
        Open { shared }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        // Even: closed. A worker entering from now on sees it and turns back; one that
        // entered before is counted in `inside` (both sides use SeqCst, so at least one
        // of them sees the other's write).
        shared.state.fetch_add(1, SeqCst);
        while shared.inside.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        shared.body.store(std::ptr::null_mut(), Relaxed);
        shared.busy.store(false, Release);
    }
}

/// A model run on this thread; see [`Team::run`].
pub(crate) struct Run {
    /// What the thread-local held before: a run inside a run keeps the outer one's state.
    outer: Option<Option<Hot>>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let outer = self.outer.take();
        // Drops the run's `Hot`, if its loops took one.
        drop(RUN.with(|run| run.replace(outer)));
    }
}

/// Keeps the workers spinning while held; see [`Team::hot`].
pub(crate) struct Hot {
    shared: Arc<Shared>,
}

impl Drop for Hot {
    fn drop(&mut self) {
        self.shared.hot.fetch_sub(1, SeqCst);
    }
}

impl Shared {
    fn wake_sleepers(&self) {
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    /// Whether a worker that last saw `seen` has something to do: a new loop, or stop.
    fn news(&self, seen: u64) -> bool {
        let state = self.state.load(SeqCst);
        (!state.is_multiple_of(2) && state != seen) || self.stop.load(Relaxed)
    }
}

/// A worker's life: wait for a loop, take tasks from it, repeat.
fn work(shared: &Shared, me: usize) {
    let mut seen = 0;
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        if shared.stop.load(Relaxed) {
            return;
        }
        let state = shared.state.load(SeqCst);
        if !state.is_multiple_of(2) && state != seen {
            seen = state;
            shared.inside.fetch_add(1, SeqCst);
            if shared.state.load(SeqCst) == state {
                let body = shared.body.load(Relaxed);
                // SAFETY: the loop is still open, and its caller will not return before
                // `inside` drops back, so the body behind the pointer is alive.
                let body = unsafe { *body };
                let run = panic::catch_unwind(AssertUnwindSafe(|| body(me)));
                if run.is_err() {
                    shared.panicked.store(true, Release);
                }
            }
            shared.inside.fetch_sub(1, SeqCst);
            idle_since = Instant::now();
            spins = 0;
            continue;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(256)
            || shared.hot.load(Relaxed) > 0
            || idle_since.elapsed() < IDLE_SPIN
        {
            std::hint::spin_loop();
            continue;
        }
        // Asleep until a loop opens, a run starts or the team stops. Counted as a
        // sleeper before the last look, under the lock the waker takes to notify.
        let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
        shared.sleepers.fetch_add(1, SeqCst);
        while !shared.news(seen) && shared.hot.load(SeqCst) == 0 {
            guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        shared.sleepers.fetch_sub(1, SeqCst);
        drop(guard);
        idle_since = Instant::now();
    }
}

/// The process's team, started on first use.
fn global() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team::new(threads_from_env()))
}

/// `RAYON_NUM_THREADS` when it is a positive number, else the CPUs this process may use.
fn threads_from_env() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once() {
        let team = Team::new(2);
        for tasks in [0, 1, 2, 3, 100, 1000] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            team.for_each_init(
                tasks,
                || (),
                |_, i| {
                    counts[i].fetch_add(1, Relaxed);
                },
            );
            assert!(counts.iter().all(|c| c.load(Relaxed) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn both_threads_take_tasks_and_scratch_is_per_thread() {
        let team = Team::new(2);
        let _hot = team.hot();
        let threads = Mutex::new(std::collections::HashSet::new());
        let inits = AtomicU32::new(0);
        // Tasks long enough that the worker, spinning, takes some of them.
        team.for_each_init(
            64,
            || {
                inits.fetch_add(1, Relaxed);
                thread::current().id()
            },
            |owner, _| {
                assert_eq!(*owner, thread::current().id());
                threads.lock().unwrap().insert(thread::current().id());
                thread::sleep(Duration::from_millis(1));
            },
        );
        assert_eq!(threads.lock().unwrap().len(), 2);
        assert_eq!(inits.load(Relaxed), 2);
    }

    #[test]
    fn a_loop_inside_a_task_runs_on_its_thread() {
        let team = Team::new(2);
        let total = AtomicU32::new(0);
        team.for_each_init(
            8,
            || (),
            |_, _| {
                team.for_each_init(
                    8,
                    || (),
                    |_, _| {
                        total.fetch_add(1, Relaxed);
                    },
                );
            },
        );
        assert_eq!(total.load(Relaxed), 64);
    }

    #[test]
    fn a_run_turns_the_team_hot_at_its_first_loop_worth_splitting() {
        let team = Team::new(2);
        let hot = || team.shared.hot.load(SeqCst);
        // Outside a run nothing is split, so no worker is woken for a loop.
        assert!(!team.worth_splitting(1000, 100));
        {
            let _run = team.run();
            // Small loops leave the workers asleep ...
            assert!(!team.worth_splitting(10, 100));
            assert_eq!(hot(), 0);
            // ... the first large one wakes them for the rest of the run, once.
            assert!(team.worth_splitting(1000, 100));
            assert_eq!(hot(), 1);
            assert!(team.worth_splitting(10_000, 100));
            assert!(!team.worth_splitting(10, 100));
            assert_eq!(hot(), 1);
        }
        assert_eq!(hot(), 0);
        assert!(!team.worth_splitting(1000, 100));
        // One thread never splits.
        let one = Team::new(1);
        let _run = one.run();
        assert!(!one.worth_splitting(1000, 100));
    }

    #[test]
    fn a_worker_asleep_is_woken_by_the_next_loop() {
        let team = Team::new(2);
        thread::sleep(IDLE_SPIN * 20);
        let threads = Mutex::new(std::collections::HashSet::new());
        team.for_each_init(
            200,
            || (),
            |_, _| {
                threads.lock().unwrap().insert(thread::current().id());
                thread::sleep(Duration::from_millis(1));
            },
        );
        assert_eq!(threads.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_goes_on() {
        let team = Team::new(2);
        let _hot = team.hot();
        let caller = thread::current().id();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            team.for_each_init(
                64,
                || (),
                |_, i| {
                    thread::sleep(Duration::from_micros(200));
                    if i % 2 == 0 && thread::current().id() != caller {
                        panic!("task {i}");
                    }
                    if i == 63 {
                        panic!("last task");
                    }
                },
            );
        }));
        assert!(result.is_err());
        let total = AtomicU32::new(0);
        team.for_each_init(
            10,
            || (),
            |_, _| {
                total.fetch_add(1, Relaxed);
            },
        );
        assert_eq!(total.load(Relaxed), 10);
    }
}
