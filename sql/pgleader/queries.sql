-- Every statement the pgleader library runs, by name (loaded by pgleader/queries.py).
--
-- Each query starts at a `-- name: <name>` line; the comment lines right after it
-- say what it is for, the rest up to the next header is the statement. Values are
-- psycopg placeholders (%s, %(name)s), never text put into the statement.
-- The pgleader.* functions called here are defined in functions.sql, next to this file.


-- The elector (pgleader/election.py) -------------------------------------------

-- name: join_election
-- Register this instance as a candidate; returns the election's advisory lock id.
select pgleader.join_election(%s, %s, %s, %s, %s);

-- name: set_lock_timeout
-- A follower waits on the lock in slices of one heartbeat (the value, e.g. '1000ms'),
-- so that it also polls for a hung leader.
select set_config('lock_timeout', %s, false);

-- name: clear_lock_timeout
-- The leader's session never gives up waiting on a lock (the epoch bump may wait
-- for fenced transactions).
select set_config('lock_timeout', '0', false);

-- name: acquire_lock
-- Wait for the election's session advisory lock (up to lock_timeout).
select pg_advisory_lock(pgleader.lock_namespace(), %s);

-- name: follower_beat
-- A follower's beat while the lock is taken: evicts a leader silent for longer
-- than the interval; returns the evicted backend's pid, or null.
select pgleader.follower_beat(%s, %s, make_interval(secs => %s));

-- name: take_leadership
-- The lock holder bumps the epoch: returns the new epoch and the previous leader.
select epoch, previous from pgleader.take_leadership(%s, %s, %s);

-- name: terminate_blockers
-- End the sessions that keep the epoch bump (the given backend) waiting.
select pid, pg_terminate_backend(pid) from unnest(pg_blocking_pids(%s)) pid;

-- name: heartbeat
-- True while this session holds the lock and its epoch is current.
select pgleader.heartbeat(%s, %s, %s);

-- name: resign
-- Close this leadership's history row with a reason and release the lock.
select pgleader.resign(%s, %s, %s, %s);


-- Fencing (pgleader/fencing.py) ------------------------------------------------

-- name: read_epoch_for_share
-- check_epoch: the election's current epoch, its row locked until the caller's
-- commit, so that a new leader's epoch bump waits for the caller. Through the
-- function (its owner's rights): the instances' role may not lock the row itself.
-- No row for an unknown election.
select epoch from pgleader.current_epoch(%s) as epoch where epoch is not null;


-- Listening (pgleader/events.py) -----------------------------------------------

-- name: ping
-- Proves a quiet listening connection is alive.
select 1;


-- The CLI (pgleader/cli.py) ----------------------------------------------------

-- name: leaders
-- `pgleader status`: one row per election.
select election, epoch, leader, host, backend_pid, lock_held, acquired_at,
       extract(epoch from heartbeat_age)::float8 as heartbeat_age_s
  from pgleader.leader order by election;
