//! A run killed with SIGKILL at any instant, then resumed (again and again), ends
//! bit for bit where an uninterrupted run ends: the checkpoint, the run record and
//! the model are each written whole or not at all.

mod common;

use common::{read_f32, run_args, scratch, stderr, synth_tiny, TINY_BATCH};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STEPS: &str = "300";

fn start(data: &Path, run: &Path, resume: bool) -> Child {
    let mut extra = [
        &TINY_BATCH[..],
        &["--steps", STEPS, "--checkpoint-every", "3"],
    ]
    .concat();
    if resume {
        extra.push("--resume");
    }
    Command::new(env!("CARGO_BIN_EXE_altc"))
        .args(run_args("models/alt_moe_tiny.ron", data, run, &extra))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("altc starts")
}

/// A small xorshift generator seeded from the clock; the seed is printed, so a
/// failing sequence of kills can be replayed with ALTC_KILL_SEED.
fn kill_delays() -> (u64, impl FnMut() -> Duration) {
    let seed = std::env::var("ALTC_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut state = seed;
    (seed, move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Duration::from_millis(10 + state % 400)
    })
}

#[test]
fn runs_killed_at_random_instants_resume_to_the_uninterrupted_result() {
    let dir = scratch("kill9");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("pairs.safetensors");
    synth_tiny(&data, 256);

    let straight = dir.join("straight");
    let o = start(&data, &straight, false).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = dir.join("killed");
    let (seed, mut delay) = kill_delays();
    eprintln!("kill delays from ALTC_KILL_SEED={seed}");
    let mut kills = 0;
    loop {
        // Until the record exists, there is nothing to resume: start afresh, as the
        // error would tell a user.
        let resume = killed.join("run.ron").exists();
        let mut child = start(&data, &killed, resume);
        let deadline = Instant::now() + delay();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match finished {
            Some(status) => {
                let o = child.wait_with_output().unwrap();
                assert!(status.success(), "after {kills} kills: {}", stderr(&o));
                break;
            }
            None if kills < 12 => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
            // Enough kills: let this one finish.
            None => {
                let o = child.wait_with_output().unwrap();
                assert!(o.status.success(), "after {kills} kills: {}", stderr(&o));
                break;
            }
        }
    }
    eprintln!("killed {kills} times");
    assert!(kills > 0, "no kill landed before the run finished");

    let (a, meta_a) = read_f32(&straight.join("checkpoint.safetensors"));
    let (b, meta_b) = read_f32(&killed.join("checkpoint.safetensors"));
    assert_eq!(meta_a.get("step"), Some(&STEPS.to_string()));
    assert_eq!(meta_a, meta_b);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, (shape, values)) in &a {
        let (other_shape, other) = &b[name];
        assert_eq!(shape, other_shape, "{name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(values) == bits(other),
            "{name} differs after {kills} kills"
        );
    }
    let litter: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(litter.is_empty(), "temporary files left: {litter:?}");
}
