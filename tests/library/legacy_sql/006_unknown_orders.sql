-- pgleader 006: recording the broker's answer for an order nobody booked answers
-- null and changes nothing. Before, gateway.complete_order went on with an empty
-- row: a fill failed on the positions' not-null columns, a rejection raised an
-- alert about no signal. The executor records only orders it booked itself; an
-- operator in psql may pass any id. (requeue_signal and mark_in_doubt already
-- answer false for one.) Idempotent.

-- Record what the broker said about an order and finish its signal; books the
-- position on a fill. Idempotent: a signal no longer 'executing' is left alone.
-- Null for an unknown client order id.
create or replace function gateway.complete_order(
    p_client_order_id text, p_outcome text, p_broker_order_id text, p_detail text
) returns text language plpgsql as $$
declare
    o gateway.orders;
    s gateway.signals;
    base_id bigint;
begin
    select * into o from gateway.orders where client_order_id = p_client_order_id;
    if not found then
        return null;
    end if;
    select * into s from gateway.signals where id = o.signal_id for update;
    if s.status <> 'executing' then
        return s.status;
    end if;
    update gateway.orders set outcome = p_outcome, broker_order_id = p_broker_order_id,
           detail = p_detail, updated_at = now()
     where id = o.id;
    update gateway.signals
       set status = case when p_outcome = 'filled' then 'executed' else 'failed' end,
           finished_at = now(), updated_at = now(), detail = p_detail
     where id = s.id;
    if p_outcome <> 'filled' then
        perform gateway.raise_alert('order_rejected', s.id, o.instance_id,
            format('%s %s rejected by %s: %s', o.action, s.instrument, o.broker, p_detail));
        return 'failed';
    end if;
    if s.type = 'EXIT' then
        update gateway.positions set status = 'closed', exit_signal_id = s.id, exit_at = now()
         where instrument = s.instrument and status = 'open';
    else
        if s.type = 'PYRAMID' then
            select p.id into base_id from gateway.positions p
             where p.instrument = s.instrument and p.status = 'open' and p.is_base_position
             order by p.entry_at desc limit 1;
        end if;
        insert into gateway.positions
            (instrument, position, signal_id, is_base_position, base_position_id, lots, entry_price, stop)
        values (s.instrument, s.position, s.id, s.type = 'BASE_ENTRY', base_id, o.quantity, s.price, s.stop);
    end if;
    return 'executed';
end
$$;
