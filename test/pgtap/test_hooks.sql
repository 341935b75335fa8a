-- pgTAP: the test interface stays shut in a server not started with sbpg.test_hooks = on (the
-- sql suite's cluster, like production): no fault point can be armed, by SET or ALTER SYSTEM.
BEGIN;
SELECT plan(5);

SELECT is(current_setting('sbpg.test_hooks'), 'off', 'sbpg.test_hooks is off unless the server was started with it');
SELECT is(current_setting('sbpg.test_fault'), '', 'no fault is armed');
SELECT throws_ok($$SET sbpg.test_fault = 'notify_queue_full'$$, '22023',
	'sbpg.test_fault is for sbpg''s own test suite', 'SET sbpg.test_fault is refused without the hooks');
SELECT throws_ok($$SET sbpg.test_hooks = on$$, '55P02', NULL, 'sbpg.test_hooks cannot be changed in a running server');
SELECT lives_ok($$SET sbpg.test_fault = ''$$, 'an empty sbpg.test_fault is accepted');

SELECT * FROM finish();
ROLLBACK;
