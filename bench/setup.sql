-- bench/setup.sql: what every benchmark's throwaway cluster starts with (bench/sbpg.sh,
-- bench/memory.sh, bench/inbox_scale.sh): sbpg, a run_as role, the table the handlers write, the
-- per-message handler and its set-based twin (the same insert), and the emulator's identity.
CREATE EXTENSION sbpg;
CREATE ROLE bench_writer NOLOGIN;
CREATE TABLE bench_orders (id bigint PRIMARY KEY, customer text, amount numeric, note text, message_id text);
GRANT INSERT ON bench_orders TO bench_writer;
CREATE FUNCTION bench_handler(m sbpg.message) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.bench_orders VALUES ((m.body->>'id')::bigint, m.body->>'customer', (m.body->>'amount')::numeric,
                                          m.body->>'note', m.message_id) $$;
GRANT EXECUTE ON FUNCTION bench_handler(sbpg.message) TO bench_writer;
CREATE FUNCTION bench_set_handler(ms sbpg.message[]) RETURNS void LANGUAGE sql AS $$
  INSERT INTO public.bench_orders SELECT (m.body->>'id')::bigint, m.body->>'customer', (m.body->>'amount')::numeric,
                                         m.body->>'note', m.message_id FROM pg_catalog.unnest(ms) m $$;
GRANT EXECUTE ON FUNCTION bench_set_handler(sbpg.message[]) TO bench_writer;
SELECT sbpg.create_identity('emu', 'sas', '{"key_name": "RootManageSharedAccessKey", "key": "SAS_KEY_VALUE"}');
