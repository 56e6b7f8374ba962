-- pgleader 003: the fencing rule as a SQL function, so that one statement can be
-- fenced on its own. In autocommit a statement is its own transaction: the row
-- lock taken here holds until everything else the statement writes commits, and
-- a new leader's epoch bump waits for it (the same rule as the client-side
-- check in pgleader/fencing.py, without its extra round trips). Idempotent.

create or replace function pgleader.check_epoch(p_election text, p_epoch bigint) returns bigint
language plpgsql as $$
declare
    current_epoch bigint;
begin
    select e.epoch into current_epoch from pgleader.election e where e.name = p_election for share;
    if current_epoch is distinct from p_epoch then
        raise exception 'pgleader: election % epoch % is fenced (current epoch is %)',
            p_election, p_epoch, coalesce(current_epoch::text, 'none')
            using errcode = 'PGL01', detail = coalesce(current_epoch::text, ''),
                  hint = 'a newer leader exists: do not act';
    end if;
    return current_epoch;
end
$$;
comment on function pgleader.check_epoch(text, bigint) is
    'Raise SQLSTATE PGL01 unless p_epoch is the current epoch; holds the election row FOR SHARE until commit.';
