//! E2B's official Python SDK (`e2b` from PyPI, pinned by
//! scripts/e2b-sdk-requirements.txt; ./test.sh installs it) drives strata
//! unchanged through `strata serve`'s E2B API: sandboxes are created, run
//! commands, move files, pause, come back, survive a server's crash, end
//! at their time-out and are killed. A smaller suite does the same with its
//! JavaScript SDK (`e2b` from npm, pinned by scripts/e2b-js). Real QEMU,
//! real guests.

mod common;

use std::process::Command;
use std::time::Duration;

use common::api::*;
use common::*;
use serde_json::Value;

fn sdk_python() -> String {
    std::env::var("STRATA_E2B_PYTHON").expect(
        "STRATA_E2B_PYTHON must name the python of a venv with E2B's SDK: ./test.sh makes one \
         (source scripts/e2b-sdk.sh)",
    )
}

/// Runs `script` with E2B's SDK pointed at `s`, as the terminal of
/// `token`; the JSON lines it printed (it prints one object per step).
fn sdk(s: &Server, token: &str, script: &str) -> Vec<Value> {
    let mut python = Command::new(sdk_python());
    python.args(["-c", &format!("{PRELUDE}{script}")]);
    run_script(python, s, token)
}

/// Runs an SDK's script with E2B's variables pointing at `s`; the JSON
/// lines it printed.
fn run_script(mut script: Command, s: &Server, token: &str) -> Vec<Value> {
    let out = script
        .env("E2B_API_URL", format!("{}/e2b", s.base))
        .env("E2B_SANDBOX_URL", format!("{}/e2b", s.base))
        .env("E2B_API_KEY", token)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "the SDK script failed:\n{stdout}\n{stderr}");
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// What every script starts with: `say(step, value)` prints a JSON line.
const PRELUDE: &str = "import json, os, sys, time\n\
                       from e2b import *\n\
                       def say(step, value): print(json.dumps({'step': step, 'value': value}), flush=True)\n";

/// Runs the ES module `script` with E2B's JavaScript SDK pointed at `s`,
/// as the terminal of `token`; the JSON lines it printed.
fn sdk_js(s: &Server, token: &str, script: &str) -> Vec<Value> {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} must be set: ./test.sh installs E2B's JavaScript SDK (source scripts/e2b-sdk.sh)")
        })
    };
    let mut node = Command::new(var("STRATA_E2B_NODE"));
    node.args(["--input-type=module", "-e", &format!("{JS_PRELUDE}{script}")])
        // Where its node_modules are: `import 'e2b'` resolves from here.
        .current_dir(var("STRATA_E2B_JS"));
    run_script(node, s, token)
}

/// What every JavaScript script starts with: `say(step, value)` prints a JSON line.
const JS_PRELUDE: &str = "import { Sandbox, CommandExitError, NotFoundError } from 'e2b'\n\
                          const say = (step, value) => console.log(JSON.stringify({ step, value }))\n\
                          const sleep = (ms) => new Promise((r) => setTimeout(r, ms))\n";

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .map(|l| &l["value"])
        .unwrap_or_else(|| panic!("no step {name} in {lines:?}"))
}

#[tokio::test]
async fn the_e2b_python_sdk_creates_sandboxes_runs_commands_moves_files_pauses_and_kills() {
    if !e2e() {
        return;
    }
    let s = serve("e2b");
    let lines = sdk(
        &s,
        &s.a,
        "sbx = Sandbox.create(template='bc', timeout=300, metadata={'purpose': 'e2b-test'}, envs={'FOO': 'bar'})\n\
         say('id', sbx.sandbox_id)\n\
         r = sbx.commands.run('echo $FOO; echo to-stderr >&2')\n\
         say('run', [r.stdout, r.stderr, r.exit_code])\n\
         try:\n\
         \x20   sbx.commands.run('echo partial; exit 3')\n\
         \x20   say('exit3', 'no exception')\n\
         except CommandExitException as e:\n\
         \x20   say('exit3', [e.exit_code, e.stdout])\n\
         r = sbx.commands.run('pwd; whoami', cwd='/tmp', envs={'FOO': 'baz'})\n\
         say('cwd', r.stdout)\n\
         data = bytes(range(256)) * 800\n\
         sbx.files.write('/root/dir/sub/blob.bin', data)\n\
         say('binary', sbx.files.read('/root/dir/sub/blob.bin', format='bytes') == data)\n\
         say('text', sbx.files.read('/root/dir/sub/blob.bin', format='bytes')[:3].hex())\n\
         import io, hashlib\n\
         big = os.urandom(1 << 20) * 300\n\
         sbx.files.write('/root/big.bin', io.BytesIO(big))\n\
         r = sbx.commands.run('stat -c %s /root/big.bin; sha256sum /root/big.bin; rm /root/big.bin')\n\
         say('big', [r.stdout.split()[0], r.stdout.split()[1] == hashlib.sha256(big).hexdigest()])\n\
         sbx.files.write('/root/dir/note.txt', 'a note')\n\
         say('list', sorted(e.name for e in sbx.files.list('/root/dir')))\n\
         say('exists', [sbx.files.exists('/root/dir/note.txt'), sbx.files.exists('/root/none')])\n\
         sbx.files.rename('/root/dir/note.txt', '/root/dir/moved.txt')\n\
         say('moved', sbx.files.read('/root/dir/moved.txt'))\n\
         say('made', [sbx.files.make_dir('/root/new'), sbx.files.make_dir('/root/new')])\n\
         sbx.files.remove('/root/dir')\n\
         say('removed', sbx.files.exists('/root/dir/moved.txt'))\n\
         try:\n\
         \x20   sbx.files.read('/root/none')\n\
         \x20   say('missing', 'read')\n\
         except NotFoundException as e:\n\
         \x20   say('missing', 'not found')\n\
         h = sbx.commands.run('read x; echo got $x', background=True, stdin=True)\n\
         sbx.commands.send_stdin(h.pid, 'hello\\n')\n\
         say('stdin', h.wait().stdout)\n\
         slow = sbx.commands.run('sleep 300', background=True)\n\
         say('listed', [p.args for p in sbx.commands.list() if p.pid == slow.pid])\n\
         say('killed', sbx.commands.kill(slow.pid))\n\
         try:\n\
         \x20   slow.wait()\n\
         \x20   say('slow', 'exited 0')\n\
         except CommandExitException as e:\n\
         \x20   say('slow', e.exit_code)\n\
         same = Sandbox.connect(sbx.sandbox_id)\n\
         say('connected', same.commands.run('echo again').stdout)\n\
         say('info', [sbx.get_info().state, sbx.get_info().metadata])\n\
         found = Sandbox.list(query=SandboxQuery(metadata={'purpose': 'e2b-test'})).next_items()\n\
         say('found', [x.sandbox_id for x in found])\n\
         seen = []\n\
         sbx.commands.run('for i in 1 2 3; do echo $i; sleep 0.1; done', on_stdout=lambda s: seen.append(s))\n\
         say('streamed', ''.join(seen))\n\
         try:\n\
         \x20   sbx.commands.run('no-such-command-anywhere')\n\
         except CommandExitException as e:\n\
         \x20   say('missing_cmd', e.exit_code)\n\
         try:\n\
         \x20   sbx.commands.run('sleep 30', timeout=1)\n\
         \x20   say('timeout', 'finished')\n\
         except TimeoutException:\n\
         \x20   say('timeout', 'timed out')\n\
         m = sbx.get_metrics()\n\
         say('metrics', [len(m), m[0].mem_total > m[0].mem_used > 0, m[0].disk_total > m[0].disk_used > 0])\n\
         import urllib.request, urllib.error\n\
         up = urllib.request.Request(sbx.upload_url('/root/up.txt'), data=b'uploaded', method='POST', headers={'content-type': 'application/octet-stream'})\n\
         urllib.request.urlopen(up).read()\n\
         say('upload', sbx.files.read('/root/up.txt'))\n\
         say('download', urllib.request.urlopen(sbx.download_url('/root/up.txt')).read().decode())\n\
         try:\n\
         \x20   urllib.request.urlopen(sbx.download_url('/root/up.txt').replace('signature=v1_', 'signature=v1_x'))\n\
         \x20   say('forged', 'served')\n\
         except urllib.error.HTTPError as e:\n\
         \x20   say('forged', e.code)\n\
         term = sbx.pty.create(PtySize(rows=24, cols=80), cwd='/tmp')\n\
         sbx.pty.send_stdin(term.pid, b'echo TTY-$((6*7)); stty size; pwd\\n')\n\
         seen = b''\n\
         for _, _, p in term:\n\
         \x20   seen += p or b''\n\
         \x20   if b'TTY-42' in seen and b'/tmp\\r\\n' in seen.split(b'TTY-42')[-1]: break\n\
         sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))\n\
         sbx.pty.send_stdin(term.pid, b'stty size; exit 5\\n')\n\
         rest = []\n\
         try:\n\
         \x20   term.wait(on_pty=lambda p: rest.append(bytes(p)))\n\
         \x20   code = 0\n\
         except CommandExitException as e:\n\
         \x20   code = e.exit_code\n\
         say('pty', [seen.decode(errors='replace'), code, b''.join(rest).decode(errors='replace')])\n\
         term2 = sbx.pty.create(PtySize(rows=24, cols=80))\n\
         say('pty_kill', sbx.pty.kill(term2.pid))\n\
         sbx.files.make_dir('/root/watched')\n\
         w = sbx.files.watch_dir('/root/watched')\n\
         sbx.files.write('/root/watched/a.txt', 'one')\n\
         e1 = sorted((e.name, e.type.name) for e in w.get_new_events())\n\
         sbx.commands.run('echo two >> /root/watched/a.txt; chmod 600 /root/watched/a.txt; touch /root/watched/b.txt')\n\
         e2 = sorted((e.name, e.type.name) for e in w.get_new_events())\n\
         sbx.files.remove('/root/watched/a.txt')\n\
         e3 = sorted((e.name, e.type.name) for e in w.get_new_events())\n\
         w.stop()\n\
         say('watch', [e1, e2, e3])\n\
         sbx.commands.run('echo kept > /root/kept')\n\
         sbx.pause()\n\
         say('paused', Sandbox.get_info(sbx.sandbox_id).state)\n\
         back = Sandbox.connect(sbx.sandbox_id)\n\
         say('resumed', [Sandbox.get_info(sbx.sandbox_id).state, back.files.read('/root/kept')])\n\
         back.kill()\n\
         say('gone', [x.sandbox_id for x in Sandbox.list().next_items()])\n",
    );
    let id = step(&lines, "id").as_str().unwrap().to_string();
    assert_eq!(step(&lines, "run"), &serde_json::json!(["bar\n", "to-stderr\n", 0]));
    assert_eq!(step(&lines, "exit3"), &serde_json::json!([3, "partial\n"]));
    assert_eq!(step(&lines, "cwd"), "/tmp\nroot\n");
    assert_eq!(step(&lines, "binary"), true);
    assert_eq!(step(&lines, "text"), "000102");
    assert_eq!(
        step(&lines, "big"),
        &serde_json::json!([(300u64 << 20).to_string(), true]),
        "an upload beyond what the server buffers streams into the guest whole"
    );
    assert_eq!(step(&lines, "list"), &serde_json::json!(["note.txt", "sub"]));
    assert_eq!(step(&lines, "exists"), &serde_json::json!([true, false]));
    assert_eq!(step(&lines, "moved"), "a note");
    assert_eq!(step(&lines, "made"), &serde_json::json!([true, false]));
    assert_eq!(step(&lines, "removed"), false);
    assert_eq!(step(&lines, "missing"), "not found");
    assert_eq!(step(&lines, "stdin"), "got hello\n");
    assert_eq!(step(&lines, "listed"), &serde_json::json!([["-l", "-c", "sleep 300"]]));
    assert_eq!(step(&lines, "killed"), true);
    assert_eq!(step(&lines, "slow"), 137, "a killed command ends by SIGKILL");
    assert_eq!(step(&lines, "connected"), "again\n");
    assert_eq!(step(&lines, "info"), &serde_json::json!(["running", {"purpose": "e2b-test"}]));
    assert!(step(&lines, "found").as_array().unwrap().contains(&Value::String(id.clone())));
    assert_eq!(step(&lines, "streamed"), "1\n2\n3\n");
    assert_eq!(step(&lines, "missing_cmd"), 127);
    assert_eq!(step(&lines, "timeout"), "timed out");
    assert_eq!(step(&lines, "metrics"), &serde_json::json!([1, true, true]));
    assert_eq!(step(&lines, "upload"), "uploaded");
    assert_eq!(step(&lines, "download"), "uploaded");
    assert_eq!(step(&lines, "forged"), 401);
    let pty = step(&lines, "pty");
    let screen = pty[0].as_str().unwrap();
    assert!(screen.contains("TTY-42\r\n24 80\r\n/tmp\r\n"), "{screen:?}");
    assert_eq!(pty[1], 5, "the PTY's shell exits with its status");
    assert!(pty[2].as_str().unwrap().contains("30 100\r\n"), "the PTY was not resized: {pty:?}");
    assert_eq!(step(&lines, "pty_kill"), true);
    assert_eq!(
        step(&lines, "watch"),
        &serde_json::json!([[["a.txt", "CREATE"]], [["a.txt", "WRITE"], ["b.txt", "CREATE"]], [["a.txt", "REMOVE"]]])
    );
    assert_eq!(step(&lines, "paused"), "paused");
    assert_eq!(step(&lines, "resumed"), &serde_json::json!(["running", "kept\n"]));
    assert!(!step(&lines, "gone").as_array().unwrap().contains(&Value::String(id.clone())));
    // A sandbox is a session of its terminal like any other: gone from `ps` too.
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(!ps.contains(&id), "{ps}");
}

#[tokio::test]
async fn e2b_sandboxes_fork_into_copies_and_snapshots_start_new_ones() {
    if !e2e() {
        return;
    }
    let s = serve_with("e2b-fork", &["--max-sessions-per-terminal", "8"]);
    let lines = sdk(
        &s,
        &s.a,
        "sbx = Sandbox.create(template='bc', timeout=300, metadata={'kind': 'parent'})\n\
         sbx.commands.run('echo parent-state > /root/state; sleep 1000 >/dev/null 2>&1 & echo $! > /root/pid')\n\
         import struct, base64, urllib.request\n\
         h = sbx.commands.run('read a; read b; echo \"$a-$b\"', background=True, stdin=True)\n\
         env = lambda m: (lambda b: bytes([0]) + struct.pack('>I', len(b)) + b)(json.dumps(m).encode())\n\
         b64 = lambda s: base64.b64encode(s).decode()\n\
         msgs = env({'start': {'process': {'pid': h.pid}}}) + env({'data': {'input': {'stdin': b64(b'one\\n')}}}) + env({'keepalive': {}}) + env({'data': {'input': {'stdin': b64(b'two\\n')}}})\n\
         rq = urllib.request.Request(os.environ['E2B_SANDBOX_URL'] + '/process.Process/StreamInput', data=msgs, method='POST', headers={'content-type': 'application/connect+json', 'connect-protocol-version': '1', 'E2b-Sandbox-Id': sbx.sandbox_id, 'X-Access-Token': sbx._envd_access_token})\n\
         reply = urllib.request.urlopen(rq).read()\n\
         say('stream_input', [list(reply[:1]), h.wait().stdout])\n\
         forks = sbx.fork(count=2, timeout=120)\n\
         say('forks', [type(f).__name__ for f in forks])\n\
         seen = []\n\
         for i, f in enumerate(forks):\n\
         \x20   r = f.commands.run(f'cat /root/state; kill -0 $(cat /root/pid) && echo alive; echo fork-{i} > /root/state; cat /root/state')\n\
         \x20   seen.append(r.stdout)\n\
         say('fork_seen', seen)\n\
         say('parent_after', sbx.commands.run('cat /root/state').stdout)\n\
         say('fork_info', [[f.get_info().metadata, f.sandbox_id != sbx.sandbox_id] for f in forks])\n\
         snap = sbx.create_snapshot()\n\
         say('listed', [snap.snapshot_id in [x.snapshot_id for x in Sandbox.list_snapshots().next_items()],\n\
         \x20   [x.snapshot_id for x in sbx.list_snapshots().next_items()] == [snap.snapshot_id]])\n\
         sbx.commands.run('echo after-snapshot > /root/state')\n\
         new = Sandbox.create(snap.snapshot_id, timeout=120)\n\
         say('from_snapshot', new.commands.run('cat /root/state; kill -0 $(cat /root/pid) && echo alive').stdout)\n\
         for x in forks + [new]: x.kill()\n\
         say('deleted', [Sandbox.delete_snapshot(snap.snapshot_id), Sandbox.delete_snapshot(snap.snapshot_id)])\n\
         try:\n\
         \x20   sbx.fork(count=21)\n\
         \x20   say('too_many', 'forked')\n\
         except Exception as e:\n\
         \x20   say('too_many', type(e).__name__)\n\
         try:\n\
         \x20   sbx.create_snapshot(name='Not A Name!')\n\
         \x20   say('bad_name', 'made')\n\
         except Exception as e:\n\
         \x20   say('bad_name', [type(e).__name__, getattr(e, 'status_code', None)])\n\
         sbx.kill()\n\
         say('left', [x.sandbox_id for x in Sandbox.list().next_items()])\n",
    );
    assert_eq!(
        step(&lines, "stream_input"),
        &serde_json::json!([[0], "one-two\n"]),
        "streamed input reaches the command"
    );
    assert_eq!(step(&lines, "forks"), &serde_json::json!(["Sandbox", "Sandbox"]));
    assert_eq!(
        step(&lines, "fork_seen"),
        &serde_json::json!(["parent-state\nalive\nfork-0\n", "parent-state\nalive\nfork-1\n"]),
        "each copy has the parent's file and process, and diverges"
    );
    assert_eq!(step(&lines, "parent_after"), "parent-state\n", "the parent runs on, untouched by its copies");
    assert_eq!(step(&lines, "fork_info"), &serde_json::json!([[{"kind": "parent"}, true], [{"kind": "parent"}, true]]));
    assert_eq!(step(&lines, "listed"), &serde_json::json!([true, true]));
    assert_eq!(step(&lines, "from_snapshot"), "parent-state\nalive\n");
    assert_eq!(step(&lines, "deleted"), &serde_json::json!([true, false]));
    assert_eq!(step(&lines, "too_many"), "InvalidArgumentException");
    assert_eq!(
        step(&lines, "bad_name"),
        &serde_json::json!(["SandboxException", 400]),
        "a bad name is refused by the API"
    );
    assert_eq!(step(&lines, "left"), &serde_json::json!([]));
}

#[tokio::test]
async fn e2b_sandboxes_end_at_their_time_out_survive_a_server_crash_and_refuse_strangers() {
    if !e2e() {
        return;
    }
    let mut s = serve("e2b-life");
    let lines = sdk(
        &s,
        &s.a,
        "short = Sandbox.create(template='bc', timeout=3)\n\
         say('short', short.sandbox_id)\n\
         long = Sandbox.create(template='bc', timeout=600)\n\
         long.commands.run('echo before > /root/mark')\n\
         long.commands.run('sleep 300', background=True)\n\
         say('long', long.sandbox_id)\n\
         try:\n\
         \x20   Sandbox.create(template='no-such-package-here', timeout=30)\n\
         \x20   say('unknown', 'created')\n\
         except Exception as e:\n\
         \x20   say('unknown', str(e))\n\
         try:\n\
         \x20   Sandbox.create(template='bc', timeout=30, api_key='0' * 64)\n\
         \x20   say('stranger', 'created')\n\
         except AuthenticationException as e:\n\
         \x20   say('stranger', 'refused')\n\
         deadline = time.time() + 60\n\
         state = 'running'\n\
         while time.time() < deadline:\n\
         \x20   try:\n\
         \x20       Sandbox.get_info(short.sandbox_id)\n\
         \x20   except NotFoundException:\n\
         \x20       state = 'ended'\n\
         \x20       break\n\
         \x20   time.sleep(0.5)\n\
         say('short_end', state)\n",
    );
    assert_eq!(step(&lines, "short_end"), "ended", "a sandbox outlived its 3 s time-out");
    assert!(step(&lines, "unknown").as_str().unwrap().contains("no-such-package-here"), "{lines:?}");
    assert_eq!(step(&lines, "stranger"), "refused");
    let long = step(&lines, "long").as_str().unwrap().to_string();

    // Another terminal's key sees nothing of it, and the data plane wants
    // the sandbox's own token.
    let other = sdk(
        &s,
        &s.b,
        &format!(
            "try:\n\
             \x20   Sandbox.connect('{long}')\n\
             \x20   say('other', 'connected')\n\
             except Exception as e:\n\
             \x20   say('other', type(e).__name__)\n"
        ),
    );
    assert_eq!(step(&other, "other"), "SandboxNotFoundException");
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("{}/e2b/process.Process/List", s.base))
        .header("E2b-Sandbox-Id", &long)
        .header("X-Access-Token", "0".repeat(64))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 401);

    // The server crashes; the next one takes the sandbox back, with its
    // token, its time-out and its files.
    s.kill9();
    let s = serve_as(s.a.clone(), s.b.clone(), &[]);
    let after = sdk(
        &s,
        &s.a,
        &format!(
            "sbx = Sandbox.connect('{long}')\n\
             say('after', sbx.files.read('/root/mark'))\n\
             say('running', [c.args for c in sbx.commands.list()])\n\
             say('end', Sandbox.get_info('{long}').end_at.timestamp() - time.time())\n\
             sbx.kill()\n"
        ),
    );
    assert_eq!(step(&after, "after"), "before\n");
    // A command a standby shell runs is listed as what it runs, also by
    // the server that took the sandbox back.
    assert_eq!(step(&after, "running"), &serde_json::json!([["-l", "-c", "sleep 300"]]));
    let left = step(&after, "end").as_f64().unwrap();
    assert!(left > 60.0, "the time-out was not kept across the crash: {left} s left");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn the_e2b_javascript_sdk_runs_commands_ptys_files_watches_pauses_and_kills() {
    if !e2e() {
        return;
    }
    let s = serve("e2b-js");
    let lines = sdk_js(
        &s,
        &s.a,
        r#"
const sbx = await Sandbox.create('bc', { timeoutMs: 300_000, metadata: { purpose: 'e2b-js' }, envs: { FOO: 'bar' } })
say('id', sbx.sandboxId)
const r = await sbx.commands.run('echo $FOO; echo to-stderr >&2')
say('run', [r.stdout, r.stderr, r.exitCode])
try { await sbx.commands.run('echo partial; exit 3'); say('exit3', 'no error') }
catch (e) { say('exit3', [e instanceof CommandExitError, e.exitCode, e.stdout]) }
say('missing', (await sbx.commands.run('no-such-command').catch((e) => e)).exitCode)
const bg = await sbx.commands.run('sleep 300', { background: true })
say('listed', (await sbx.commands.list()).some((p) => p.pid === bg.pid))
say('killed', await sbx.commands.kill(bg.pid))
let seen = ''
const pty = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { seen += new TextDecoder().decode(d) } })
await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('echo pty-$((6*7)); stty size\n'))
for (let i = 0; i < 100 && !seen.includes('24 80'); i++) await sleep(100)
await sbx.pty.resize(pty.pid, { cols: 100, rows: 30 })
await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size\n'))
for (let i = 0; i < 100 && !seen.includes('30 100'); i++) await sleep(100)
say('pty', [seen.includes('pty-42'), seen.includes('24 80'), seen.includes('30 100')])
await sbx.pty.kill(pty.pid)
await sbx.files.makeDir('/root/w')
const events = []
const watch = await sbx.files.watchDir('/root/w', (e) => events.push(`${e.type} ${e.name}`))
await sbx.files.write('/root/w/note.txt', 'a note')
const data = new Uint8Array(70000).map((_, i) => i % 256)
await sbx.files.write('/root/w/blob.bin', data.buffer)
for (let i = 0; i < 100 && events.length < 2; i++) await sleep(100)
await watch.stop()
say('watch', events.sort())
say('text', await sbx.files.read('/root/w/note.txt'))
const back = await sbx.files.read('/root/w/blob.bin', { format: 'bytes' })
say('bytes', back.length === data.length && back.every((b, i) => b === data[i]))
say('list', (await sbx.files.list('/root/w')).map((f) => f.name).sort())
await sbx.files.rename('/root/w/note.txt', '/root/w/moved.txt')
await sbx.files.remove('/root/w/blob.bin')
say('after', [await sbx.files.exists('/root/w/moved.txt'), await sbx.files.exists('/root/w/blob.bin')])
say('info', (await sbx.files.getInfo('/root/w/moved.txt')).size)
await sbx.setTimeout(600_000)
const info = await sbx.getInfo()
say('getinfo', [info.templateId, info.metadata])
say('listed-sandbox', (await Sandbox.list({ query: { metadata: { purpose: 'e2b-js' } } }).nextItems()).map((x) => x.sandboxId))
await sbx.betaPause()
const again = await Sandbox.connect(sbx.sandboxId)
say('resumed', (await again.commands.run('cat /root/w/moved.txt')).stdout)
await again.kill()
say('gone', await Sandbox.connect(sbx.sandboxId).then(() => 'still there', (e) => e instanceof NotFoundError))
"#,
    );
    let id = step(&lines, "id").as_str().unwrap().to_string();
    assert_eq!(step(&lines, "run"), &serde_json::json!(["bar\n", "to-stderr\n", 0]));
    assert_eq!(step(&lines, "exit3"), &serde_json::json!([true, 3, "partial\n"]));
    assert_eq!(step(&lines, "missing"), 127);
    assert_eq!((step(&lines, "listed"), step(&lines, "killed")), (&Value::Bool(true), &Value::Bool(true)));
    assert_eq!(step(&lines, "pty"), &serde_json::json!([true, true, true]));
    assert_eq!(step(&lines, "watch"), &serde_json::json!(["create blob.bin", "create note.txt"]));
    assert_eq!(step(&lines, "text"), "a note");
    assert_eq!(step(&lines, "bytes"), true);
    assert_eq!(step(&lines, "list"), &serde_json::json!(["blob.bin", "note.txt"]));
    assert_eq!(step(&lines, "after"), &serde_json::json!([true, false]));
    assert_eq!(step(&lines, "info"), 6);
    assert_eq!(step(&lines, "getinfo"), &serde_json::json!(["bc", {"purpose": "e2b-js"}]));
    assert_eq!(step(&lines, "listed-sandbox"), &serde_json::json!([id]));
    assert_eq!(step(&lines, "resumed"), "a note");
    assert_eq!(step(&lines, "gone"), true);
}

/// Whether the QEMU of session `id` was started with a network device on
/// its command line (restored from an image that holds one), not
/// hot-plugged.
fn network_device_on_command_line(id: &str) -> bool {
    let qemu = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .find(|c| c.starts_with("qemu-system") && c.contains(&format!("/sessions/{id}/")))
        .unwrap_or_else(|| panic!("no QEMU for session {id}"));
    qemu.contains("virtio-net-pci")
}

#[tokio::test]
async fn sandboxes_from_an_e2b_pool_have_their_network_in_state_and_run_first_commands_on_standby_shells() {
    if !e2e() {
        return;
    }
    let s = serve_with("e2b-pool", &["--pool", "e2b:bc=2-2"]);
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let m = http.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
        let full = m
            .lines()
            .any(|l| l.starts_with("strata_pool_sessions{") && l.contains("package=\"e2b:bc\"") && l.ends_with(" 2"));
        if full {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the E2B pool never filled: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lines = sdk(
        &s,
        &s.a,
        "fresh = Sandbox.create(template='bc', timeout=120)\n\
         say('fresh_id', fresh.sandbox_id)\n\
         say('untouched', [c.args for c in fresh.commands.list()])\n\
         s = Sandbox.create(template='bc', timeout=120)\n\
         say('id', s.sandbox_id)\n\
         r = s.commands.run('echo hi; echo $0 >&2; read -t 1 x || echo no-input')\n\
         say('first', [r.stdout, r.stderr, r.exit_code])\n\
         say('env', s.commands.run('echo $X', envs={'X': 'set'}).stdout)\n\
         try:\n\
         \x20   s.commands.run('exit 3')\n\
         except CommandExitException as e:\n\
         \x20   say('exit', e.exit_code)\n\
         say('route', s.commands.run('cat /proc/net/route').stdout)\n\
         say('dns', s.commands.run('cat /etc/resolv.conf').stdout)\n\
         kill = 'for p in /proc/[0-9]*; do grep -q \"strata_comman[d]\" $p/cmdline && kill -9 ${p#/proc/}; done; true'\n\
         s.commands.run(kill, envs={'NOT': 'on-a-standby'})\n\
         time.sleep(0.5)\n\
         say('after_pkill', s.commands.run('echo after').stdout)\n\
         bg = s.commands.run('sleep 60', background=True)\n\
         say('listed', [c.args for c in s.commands.list()])\n\
         bg.kill()\n\
         deadline = time.time() + 10\n\
         while s.commands.list() and time.time() < deadline:\n\
         \x20   time.sleep(0.1)\n\
         say('after_kill', [c.args for c in s.commands.list()])\n",
    );
    // A sandbox given no command lists none (its waiting shells are not commands).
    assert_eq!(step(&lines, "untouched"), &serde_json::json!([]));
    // The first command ran on a standby shell exactly as `bash -l -c` runs it.
    assert_eq!(step(&lines, "first"), &serde_json::json!(["hi\nno-input\n", "/bin/bash\n", 0]));
    assert_eq!(step(&lines, "env"), "set\n");
    assert_eq!(step(&lines, "exit"), 3);
    // The network is configured: its default route through QEMU's gateway, its DNS.
    let route = step(&lines, "route").as_str().unwrap();
    assert!(route.lines().any(|l| l.split_whitespace().nth(2) == Some("0202000A")), "{route}");
    assert!(step(&lines, "dns").as_str().unwrap().contains("10.0.2.3"), "{lines:?}");
    // A standby shell killed from inside is not given the next command.
    assert_eq!(step(&lines, "after_pkill"), "after\n");
    assert_eq!(step(&lines, "listed"), &serde_json::json!([["-l", "-c", "sleep 60"]]));
    assert_eq!(step(&lines, "after_kill"), &serde_json::json!([]));
    // Both restored with the network device in their saved state.
    for id in [step(&lines, "id"), step(&lines, "fresh_id")] {
        assert!(network_device_on_command_line(id.as_str().unwrap()), "session {id} had its network hot-plugged");
    }
}
