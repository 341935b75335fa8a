// sbemu/main.cpp
//   sbemu: a local Azure Service Bus emulator (AMQP 1.0) for development and tests.
#include "auth.hpp"
#include "broker.hpp"
#include "config.hpp"
#include "control.hpp"
#include "server.hpp"
#include "util.hpp"

#include <csignal>
#include <cstdio>
#include <cstring>
#include <thread>

#include <pthread.h>
#include <unistd.h>

using namespace sbemu;

namespace {

const char kVersion[] = "0.1.0";

const char kUsage[] =
    "usage: sbemu [options]\n"
    "\n"
    "A local Azure Service Bus emulator speaking AMQP 1.0. It reads the entity file of\n"
    "Microsoft's Service Bus emulator (Config.json) and accepts SAS and Entra ID (JWT) tokens.\n"
    "\n"
    "Entities:\n"
    "  --config FILE             Config.json (UserConfig.Namespaces[0] with Queues and Topics)\n"
    "  --queue NAME              add a queue with default properties (repeatable)\n"
    "\n"
    "Listening:\n"
    "  --listen HOST:PORT        plain AMQP listener (repeatable; default 127.0.0.1:5672;\n"
    "                            port 0 picks a free port, shown in the readiness line)\n"
    "  --tls-listen HOST:PORT    AMQP over TLS listener (repeatable; needs --tls-cert, --tls-key)\n"
    "  --tls-cert FILE           PEM certificate (chain) for TLS listeners\n"
    "  --tls-key FILE            PEM private key for TLS listeners\n"
    "  --tls-key-password PW     password of the private key, if encrypted\n"
    "  --control HOST:PORT       HTTP control interface for tests (counts, fault injection);\n"
    "                            off unless given; see test/sbemu/README.md for its routes\n"
    "\n"
    "Security:\n"
    "  --sas-key NAME=KEY[:RIGHTS]  a shared access key (repeatable); RIGHTS is a comma list of\n"
    "                            Listen, Send, Manage (default Manage). Without any --sas-key the\n"
    "                            key RootManageSharedAccessKey=SAS_KEY_VALUE of Microsoft's emulator\n"
    "                            is configured.\n"
    "  --jwt-public-key FILE     PEM public key (or certificate) that signs accepted JWTs (repeatable)\n"
    "  --jwks FILE               JWKS document with RSA signing keys (repeatable)\n"
    "  --jwt-audience AUD        an extra accepted JWT audience (default https://servicebus.azure.net)\n"
    "  --cbs-grace SECONDS       close connections that put no valid token within this time (20)\n"
    "  --no-auth                 links need no token (local experiments only)\n"
    "\n"
    "Limits:\n"
    "  --max-message-size BYTES  largest message or batch accepted (262144, as Standard tier)\n"
    "  --session-wait SECONDS    how long accept-next-session waits when the client sets no timeout (60)\n"
    "\n"
    "Logging:\n"
    "  --log-level LEVEL         error, warn, info (default), debug\n"
    "  --log-file FILE           append the log to FILE instead of standard error\n"
    "                            (PN_TRACE_FRM=1 in the environment traces AMQP frames)\n"
    "  --help, --version\n"
    "\n"
    "When listening, sbemu prints one line to standard output and flushes it:\n"
    "  sbemu ready amqp=amqp://127.0.0.1:5672 control=http://127.0.0.1:5673 namespace=NAME entities=N\n"
    "and stops on SIGTERM or SIGINT.\n";

// Seconds given on the command line, as milliseconds within [0, one year].
int64_t
SecondsArg(const std::string &v) {
	double s = std::strtod(v.c_str(), nullptr);
	if (!(s > 0))
		return 0;
	if (s > 365.0 * 86400)
		s = 365.0 * 86400;
	return static_cast<int64_t>(s * 1000);
}

bool
NeedArg(int i, int argc, const char *opt) {
	if (i + 1 >= argc) {
		std::fprintf(stderr, "sbemu: %s needs a value\n", opt);
		return false;
	}
	return true;
}

} // namespace

int
main(int argc, char **argv) {
	ServerOptions opts;
	std::string config_path, control_addr;
	std::vector<std::string> queues, pem_files, jwks_files;
	bool sas_given = false;
	for (int i = 1; i < argc; ++i) {
		std::string a = argv[i];
		auto val = [&]() -> std::string { return argv[++i]; };
		if (a == "--help" || a == "-h") {
			std::fputs(kUsage, stdout);
			return 0;
		} else if (a == "--version") {
			std::printf("sbemu %s\n", kVersion);
			return 0;
		} else if (a == "--no-auth") {
			opts.no_auth = true;
			continue;
		}
		if (a.compare(0, 2, "--") != 0) {
			std::fprintf(stderr, "sbemu: unexpected argument '%s' (see --help)\n", a.c_str());
			return 2;
		}
		if (!NeedArg(i, argc, a.c_str()))
			return 2;
		if (a == "--config")
			config_path = val();
		else if (a == "--queue")
			queues.push_back(val());
		else if (a == "--listen")
			opts.listen.push_back(val());
		else if (a == "--tls-listen")
			opts.tls_listen.push_back(val());
		else if (a == "--tls-cert")
			opts.tls_cert = val();
		else if (a == "--tls-key")
			opts.tls_key = val();
		else if (a == "--tls-key-password")
			opts.tls_key_password = val();
		else if (a == "--control")
			control_addr = val();
		else if (a == "--sas-key") {
			std::string v = val();
			size_t eq = v.find('=');
			if (eq == std::string::npos || eq == 0) {
				std::fprintf(stderr, "sbemu: --sas-key wants NAME=KEY[:RIGHTS]\n");
				return 2;
			}
			SasKey k;
			k.name = v.substr(0, eq);
			k.key = v.substr(eq + 1);
			size_t colon = k.key.rfind(':');
			if (colon != std::string::npos) {
				unsigned rights;
				if (ParseRights(k.key.substr(colon + 1), &rights)) {
					k.rights = rights;
					k.key.resize(colon);
				}
			}
			opts.sas_keys.push_back(k);
			sas_given = true;
		} else if (a == "--jwt-public-key")
			pem_files.push_back(val());
		else if (a == "--jwks")
			jwks_files.push_back(val());
		else if (a == "--jwt-audience")
			opts.jwt_audiences.push_back(val());
		else if (a == "--cbs-grace")
			opts.cbs_grace_ms = SecondsArg(val());
		else if (a == "--max-message-size")
			opts.max_message_size = std::strtoull(val().c_str(), nullptr, 10);
		else if (a == "--session-wait")
			opts.session_wait_ms = SecondsArg(val());
		else if (a == "--log-level") {
			LogLevel lvl;
			if (!ParseLogLevel(val(), &lvl)) {
				std::fprintf(stderr, "sbemu: unknown log level\n");
				return 2;
			}
			SetLogLevel(lvl);
		} else if (a == "--log-file") {
			std::string err;
			if (!SetLogFile(val(), &err)) {
				std::fprintf(stderr, "sbemu: %s\n", err.c_str());
				return 2;
			}
		} else {
			std::fprintf(stderr, "sbemu: unknown option '%s' (see --help)\n", a.c_str());
			return 2;
		}
	}
	if (!sas_given)
		opts.sas_keys.push_back({"RootManageSharedAccessKey", "SAS_KEY_VALUE", kAllRights});
	if (opts.listen.empty() && opts.tls_listen.empty())
		opts.listen.push_back("127.0.0.1:5672");
	if (opts.max_message_size == 0) {
		std::fprintf(stderr, "sbemu: --max-message-size must be positive\n");
		return 2;
	}

	NamespaceConfig cfg;
	if (!config_path.empty()) {
		std::string err;
		std::vector<std::string> warnings;
		if (!LoadConfigFile(config_path, &cfg, &err, &warnings)) {
			std::fprintf(stderr, "sbemu: %s\n", err.c_str());
			return 2;
		}
		for (auto &w : warnings)
			LOG_WARN("%s", w.c_str());
	}
	for (auto &q : queues) {
		QueueConfig qc;
		qc.name = q;
		cfg.queues.push_back(qc);
	}
	if (!queues.empty()) {
		std::string err;
		if (!ValidateNamespace(cfg, &err)) {
			std::fprintf(stderr, "sbemu: %s (with --queue)\n", err.c_str());
			return 2;
		}
	}
	JwtKeys jwt;
	for (auto &f : pem_files) {
		std::string err;
		if (!jwt.AddPemFile(f, &err)) {
			std::fprintf(stderr, "sbemu: %s\n", err.c_str());
			return 2;
		}
	}
	for (auto &f : jwks_files) {
		std::string err;
		if (!jwt.AddJwksFile(f, &err)) {
			std::fprintf(stderr, "sbemu: %s\n", err.c_str());
			return 2;
		}
	}

	// Signals are taken by one thread with sigwait; every other thread blocks them.
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
	std::signal(SIGPIPE, SIG_IGN);

	Broker broker(cfg);
	size_t entity_count = cfg.queues.size();
	for (auto &t : cfg.topics)
		entity_count += 1 + t.subscriptions.size();
	Server server(broker, opts, &jwt);
	ControlServer control(server);
	std::string control_url;
	if (!control_addr.empty()) {
		std::string err;
		if (!control.Start(control_addr, &err)) {
			std::fprintf(stderr, "sbemu: %s\n", err.c_str());
			return 2;
		}
		control_url = "http://" + control.bound();
	}
	std::string err;
	bool ok = server.Start(
	    [&](const std::vector<std::string> &addrs) {
		    std::string line = "sbemu ready";
		    for (auto &a : addrs)
			    line += (a.compare(0, 5, "amqps") == 0 ? " amqps=" : " amqp=") + a;
		    if (!control_url.empty())
			    line += " control=" + control_url;
		    line += " namespace=" + cfg.name + " entities=" + std::to_string(entity_count);
		    std::printf("%s\n", line.c_str());
		    std::fflush(stdout);
		    LOG_INFO("%s", line.c_str());
	    },
	    &err);
	if (!ok) {
		std::fprintf(stderr, "sbemu: %s\n", err.c_str());
		return 2;
	}
	std::thread sig_thread([&] {
		int sig = 0;
		sigwait(&sigs, &sig);
		LOG_INFO("signal %d: stopping", sig);
		server.Stop();
	});
	sig_thread.detach();
	server.Run();
	control.Stop();
	LOG_INFO("stopped");
	std::fflush(stdout);
	_exit(0); // the proactor's connections are torn down with the process
}
