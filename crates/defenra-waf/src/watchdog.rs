//! The run budget without a per-instruction hook on every run.
//!
//! With LuaJIT, a count hook makes every bytecode go through `lj_vm_inshook`: about 8 % of
//! a short script's instructions, and 1-1.5 µs of a cold 12 µs call. Nearly every run ends
//! long before a budget matters, so the hook is off while a script runs, and this watchdog
//! turns it on for a run that is still going after one tick (5 to 10 ms): from then on the
//! budget is checked every [`HOOK_INTERVAL`](crate::sandbox::HOOK_INTERVAL) instructions
//! as before.
//!
//! The hook must be set on the thread that runs the script: `lua_sethook` from another
//! thread would race with the VM's own updates of the same byte (its "in a hook" flag), and
//! a lost update there could disable hooks for good. So the watchdog thread sends the
//! worker thread a signal, and the signal handler, on the worker thread, calls
//! `lua_sethook`. LuaJIT supports exactly this (its own `luajit` command stops a script on
//! Ctrl-C that way). If the signal cannot be had (another handler owns it), or the host
//! cannot run a thread for the watchdog, each state keeps its hook on for every run.
//!
//! States:
//!
//! ```text
//!   IDLE --run starts--> RUNNING --one tick--> ARMING --handler sets the hook--> ARMED
//!     ^                     |                    |                                 |
//!     +------run ends-------+--------------------+--------run ends (hook off)-------+
//! ```
//!
//! Each run has a generation number beside its phase in one atomic word, so the watchdog
//! only arms the run it saw, and a signal that arrives late (after its run ended) finds
//! nothing to do. An armed run whose hook did not fire within a tick (its setting was lost,
//! or its instructions are few and slow: long library calls) is armed again with a count
//! of one, so its next instruction checks the budget.

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use mlua::ffi;
use parking_lot::Mutex;

/// How often the watchdog looks at the runs; a run is armed after one to two ticks.
pub(crate) const TICK: Duration = Duration::from_millis(5);

const PHASE: u64 = 0b11;
const IDLE: u64 = 0;
const RUNNING: u64 = 1;
const ARMING: u64 = 2;
const ARMED: u64 = 3;

/// One Lua state's run, shared between its worker thread and the watchdog.
pub(crate) struct Slot {
    /// Generation << 2 | phase.
    state: AtomicU64,
    /// Hook calls so far: a hook that does not fire after arming was lost.
    fired: AtomicU64,
    /// Set once, on the state's thread, before the first run.
    target: OnceLock<Target>,
    /// The watchdog is between arming this run and its `pthread_kill` returning: the run's
    /// end waits for it, so the thread cannot exit before the signal is sent.
    sending: AtomicBool,
    /// The run was armed but made no hook call for a whole tick: its instructions are few
    /// and slow (long library calls: `s:upper()` of a megabyte, `ngx.md5`, ...), so the
    /// countdown of [`HOOK_INTERVAL`](crate::sandbox::HOOK_INTERVAL) instructions would
    /// not reach zero before the next re-arm restarted it. The handler then arms a count of
    /// one, so the very next instruction checks the budget, and that hook call puts the
    /// usual interval back ([`Slot::fired`]).
    urgent: AtomicBool,
}

/// What the signal handler needs: all of it only used on the state's own thread.
struct Target {
    thread: libc::pthread_t,
    lua: *mut ffi::lua_State,
    hook: ffi::lua_Hook,
    interval: c_int,
}

// SAFETY: `lua` is only dereferenced by the signal handler and by the owning sandbox, both
// on the thread that owns the state; other threads only read `thread` (a plain id).
#[allow(unsafe_code)]
unsafe impl Send for Target {}
#[allow(unsafe_code)]
unsafe impl Sync for Target {}

thread_local! {
    /// The slot whose run this thread is in, for the signal handler; null between runs.
    static CURRENT: Cell<*const Slot> = const { Cell::new(std::ptr::null()) };
}

impl Slot {
    /// Records the state to arm: its main thread, mlua's hook function and the interval.
    /// Called on the state's thread.
    pub(crate) fn bind(&self, lua: *mut ffi::lua_State, hook: ffi::lua_Hook, interval: c_int) {
        // SAFETY: pthread_self has no preconditions.
        #[allow(unsafe_code)]
        let thread = unsafe { libc::pthread_self() };
        let _ = self.target.set(Target {
            thread,
            lua,
            hook,
            interval,
        });
    }

    /// Counts a hook call (called by the hook, on the state's thread). After an urgent
    /// arming (a count of one), sets the usual interval again.
    pub(crate) fn fired(&self) {
        self.fired.fetch_add(1, Ordering::Relaxed);
        if self.urgent.swap(false, Ordering::Relaxed)
            && let Some(target) = self.target.get()
        {
            // SAFETY: called from the hook, on the thread inside the state's VM; setting a
            // hook from within a hook is ordinary API use (Lua's own debug.sethook does it).
            #[allow(unsafe_code)]
            unsafe {
                ffi::lua_sethook(
                    target.lua,
                    Some(target.hook),
                    ffi::LUA_MASKCOUNT,
                    target.interval,
                );
            }
        }
    }

    /// Hook calls so far.
    #[cfg(test)]
    pub(crate) fn hook_calls(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    /// A run starts on this thread, with the next generation (only this thread starts
    /// runs, and between runs the state is IDLE, so the word is this thread's to bump).
    pub(crate) fn begin(self: &Arc<Self>) {
        CURRENT.with(|current| current.set(Arc::as_ptr(self)));
        let next = (self.state.load(Ordering::Relaxed) & !PHASE).wrapping_add(PHASE + 1);
        self.state.store(next | RUNNING, Ordering::Release);
    }

    /// The run ends: nothing can arm it any more, and a hook the watchdog set is off.
    pub(crate) fn end(&self) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            let idle = state & !PHASE | IDLE;
            match state & PHASE {
                IDLE => break,
                // A signal still on its way finds the run over and does nothing.
                RUNNING | ARMING => {
                    if self
                        .state
                        .compare_exchange(state, idle, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        break;
                    }
                }
                _ => {
                    if self
                        .state
                        .compare_exchange(state, idle, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        if let Some(target) = self.target.get() {
                            // SAFETY: on the state's own thread, between two VM calls.
                            #[allow(unsafe_code)]
                            unsafe {
                                ffi::lua_sethook(target.lua, None, 0, 0);
                            }
                        }
                        break;
                    }
                }
            }
        }
        while self.sending.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        CURRENT.with(|current| current.set(std::ptr::null()));
    }
}

/// The signal handler: arms the hook of this thread's current run if the watchdog asked.
extern "C" fn on_signal(_: c_int) {
    let slot = CURRENT.with(Cell::get);
    if slot.is_null() {
        return;
    }
    // SAFETY: CURRENT is set only during a run, while the sandbox holds the slot's Arc.
    #[allow(unsafe_code)]
    let slot = unsafe { &*slot };
    let state = slot.state.load(Ordering::Acquire);
    if state & PHASE != ARMING {
        return;
    }
    let Some(target) = slot.target.get() else {
        return;
    };
    // SAFETY: this handler runs on the thread that is inside the state's VM; LuaJIT's
    // lua_sethook only stores the hook and rewrites the dispatch table, which the VM
    // re-reads at every instruction (the pattern of LuaJIT's own SIGINT handler).
    #[allow(unsafe_code)]
    unsafe {
        let count = if slot.urgent.load(Ordering::Relaxed) {
            1
        } else {
            target.interval
        };
        ffi::lua_sethook(target.lua, Some(target.hook), ffi::LUA_MASKCOUNT, count);
    }
    let _ = slot.state.compare_exchange(
        state,
        state & !PHASE | ARMED,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

/// The signal the watchdog uses: a real-time one, left alone by the Rust runtime and tokio.
fn signal_number() -> c_int {
    libc::SIGRTMIN() + 7
}

/// Installs the handler once per process. False when the signal already has a handler
/// that is not ours (then every state keeps its hook on).
fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let signal = signal_number();
        // SAFETY: sigaction with a zeroed struct queries the current disposition; the new
        // one points at an extern "C" handler that only touches atomics, a const
        // thread-local and lua_sethook.
        #[allow(unsafe_code)]
        unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0
                || current.sa_sigaction != libc::SIG_DFL
            {
                return false;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        }
    })
}

/// One engine's watchdog: its thread runs while the engine lives and some state exists.
pub(crate) struct Watchdog {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    slots: Mutex<Vec<Arc<Slot>>>,
    stop: AtomicBool,
}

impl Watchdog {
    pub(crate) fn new() -> Self {
        Watchdog {
            inner: Arc::new(Inner {
                slots: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            }),
            thread: Mutex::new(None),
        }
    }

    /// A slot for a new state, or `None` when the watchdog cannot work here (the state
    /// then keeps its hook on).
    pub(crate) fn register(&self) -> Option<Arc<Slot>> {
        if !install() {
            return None;
        }
        let mut thread = self.thread.lock();
        if thread.is_none() {
            let inner = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("waf-watchdog".to_owned())
                .spawn(move || watch(&inner));
            match spawned {
                Ok(handle) => *thread = Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "cannot start the waf watchdog; hooks stay on");
                    return None;
                }
            }
        }
        let slot = Arc::new(Slot {
            state: AtomicU64::new(IDLE),
            fired: AtomicU64::new(0),
            urgent: AtomicBool::new(false),
            target: OnceLock::new(),
            sending: AtomicBool::new(false),
        });
        self.inner.slots.lock().push(Arc::clone(&slot));
        Some(slot)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(handle) = self.thread.get_mut().take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// The watchdog thread: every tick, arms the runs it saw running at the previous tick.
fn watch(inner: &Weak<Inner>) {
    // (slot address, state, fired) at the previous tick.
    let mut seen: Vec<(usize, u64, u64)> = Vec::new();
    loop {
        std::thread::park_timeout(TICK);
        let Some(inner) = inner.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let mut slots = inner.slots.lock();
        // A state that is gone holds the only other reference.
        slots.retain(|slot| Arc::strong_count(slot) > 1);
        let mut now = Vec::with_capacity(slots.len());
        for slot in slots.iter() {
            let address = Arc::as_ptr(slot) as usize;
            let state = slot.state.load(Ordering::Acquire);
            let fired = slot.fired.load(Ordering::Relaxed);
            let before = seen.iter().find(|(at, ..)| *at == address);
            let same_run = before.is_some_and(|(_, was, _)| *was == state);
            let stalled = match state & PHASE {
                RUNNING => same_run,
                // Armed, yet no hook call since the last tick: the setting was lost.
                ARMED => same_run && before.is_some_and(|(_, _, was)| *was == fired),
                _ => false,
            };
            if stalled {
                if state & PHASE == ARMED {
                    slot.urgent.store(true, Ordering::Relaxed);
                }
                arm(slot, state);
            }
            now.push((address, slot.state.load(Ordering::Acquire), fired));
        }
        seen = now;
    }
}

fn arm(slot: &Slot, state: u64) {
    let Some(target) = slot.target.get() else {
        return;
    };
    // `sending` first: a run that ends after it waits for the signal to be sent; one that
    // ended before it makes the exchange below fail (all sequentially consistent).
    slot.sending.store(true, Ordering::SeqCst);
    if slot
        .state
        .compare_exchange(
            state,
            state & !PHASE | ARMING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_ok()
    {
        // SAFETY: pthread_kill on a thread id recorded by that thread, which is inside a
        // run (the state was RUNNING or ARMED just now) and cannot end it, nor exit, before
        // `sending` is clear again.
        #[allow(unsafe_code)]
        unsafe {
            libc::pthread_kill(target.thread, signal_number());
        }
    }
    slot.sending.store(false, Ordering::SeqCst);
}
