// istiod_check reads a cluster's cacerts the way istiod (Go's crypto/x509) does, signs
// workload certificates under it as istiod's CA would, and verifies them, so the tests
// learn what Istio's control plane makes of what meshca installs (openssl is the other
// verifier). Standard library only: the tests build it offline.
//
//	istiod_check cacerts DIR              istiod's checks of DIR's four files
//	istiod_check leaf DIR SAN             a workload certificate under DIR, verified
//	istiod_check mtls SERVER_DIR CLIENT_DIR  one mTLS handshake between two clusters
//
// Prints "ok" and exits 0, or prints why and exits 1 (2: bad usage or unreadable files).
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func main() {
	args := os.Args[1:]
	var err error
	switch {
	case len(args) == 2 && args[0] == "cacerts":
		_, err = loadBundle(args[1])
	case len(args) == 3 && args[0] == "leaf":
		err = leaf(args[1], args[2])
	case len(args) == 3 && args[0] == "mtls":
		err = mtls(args[1], args[2])
	default:
		fmt.Fprintln(os.Stderr, "usage: istiod_check cacerts DIR | leaf DIR SAN | mtls SERVER_DIR CLIENT_DIR")
		os.Exit(2)
	}
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("ok")
}

// bundle is a cluster's cacerts as istiod holds them.
type bundle struct {
	caCert        *x509.Certificate
	caKey         crypto.Signer
	chain         []*x509.Certificate
	roots         *x509.CertPool
	intermediates *x509.CertPool
}

func certificates(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%s: a %s block", path, block.Type)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no certificate", path)
	}
	return certs, nil
}

// loadBundle does what istiod does with a cacerts directory: the key must be the CA
// certificate's, the CA certificate a CA that may sign certificates, and it must verify
// through cert-chain.pem to a root in root-cert.pem.
func loadBundle(dir string) (*bundle, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("ca-cert.pem and ca-key.pem: %v", err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("ca-key.pem: not a signing key")
	}
	caCert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	if !caCert.IsCA || !caCert.BasicConstraintsValid || caCert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("ca-cert.pem: not a CA that may sign certificates")
	}
	chain, err := certificates(filepath.Join(dir, "cert-chain.pem"))
	if err != nil {
		return nil, err
	}
	rootCerts, err := certificates(filepath.Join(dir, "root-cert.pem"))
	if err != nil {
		return nil, err
	}
	b := &bundle{caCert: caCert, caKey: signer, chain: chain, roots: x509.NewCertPool(), intermediates: x509.NewCertPool()}
	for _, root := range rootCerts {
		b.roots.AddCert(root)
	}
	for _, cert := range chain {
		b.intermediates.AddCert(cert)
	}
	if _, err := b.verify(caCert); err != nil {
		return nil, fmt.Errorf("ca-cert.pem: %v", err)
	}
	return b, nil
}

func (b *bundle) verify(cert *x509.Certificate) ([][]*x509.Certificate, error) {
	return cert.Verify(x509.VerifyOptions{
		Roots:         b.roots,
		Intermediates: b.intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
}

// issue signs a workload certificate for san ("URI:..." or "DNS:...") the way istiod's CA
// does: empty subject (so the SAN extension is critical), a fresh P-256 key, digital
// signature and key encipherment, server and client auth, one hour.
func (b *bundle) issue(san string) (tls.Certificate, *x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	template := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	for _, name := range strings.Split(san, ",") {
		switch {
		case strings.HasPrefix(name, "URI:"):
			uri, err := url.Parse(strings.TrimPrefix(name, "URI:"))
			if err != nil {
				return tls.Certificate{}, nil, err
			}
			template.URIs = append(template.URIs, uri)
		case strings.HasPrefix(name, "DNS:"):
			template.DNSNames = append(template.DNSNames, strings.TrimPrefix(name, "DNS:"))
		default:
			return tls.Certificate{}, nil, fmt.Errorf("SAN %q: neither URI: nor DNS:", name)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, template, b.caCert, &key.PublicKey, b.caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	presented := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}
	for _, link := range b.chain {
		presented.Certificate = append(presented.Certificate, link.Raw)
	}
	return presented, cert, nil
}

func leaf(dir, san string) error {
	b, err := loadBundle(dir)
	if err != nil {
		return err
	}
	_, cert, err := b.issue(san)
	if err != nil {
		return err
	}
	if _, err := b.verify(cert); err != nil {
		return fmt.Errorf("refused: %v", err)
	}
	return nil
}

// mtls runs one handshake: a workload of the server's cluster serves, one of the client's
// connects, each presenting its certificate and chain and trusting only its own cluster's
// root-cert.pem; the client then reads a line.
func mtls(serverDir, clientDir string) error {
	server, err := loadBundle(serverDir)
	if err != nil {
		return fmt.Errorf("%s: %v", serverDir, err)
	}
	client, err := loadBundle(clientDir)
	if err != nil {
		return fmt.Errorf("%s: %v", clientDir, err)
	}
	serverCert, _, err := server.issue("URI:spiffe://cluster.local/ns/default/sa/server,DNS:server.test")
	if err != nil {
		return err
	}
	clientCert, _, err := client.issue("URI:spiffe://cluster.local/ns/default/sa/client")
	if err != nil {
		return err
	}
	listener, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    server.roots,
	})
	if err != nil {
		return err
	}
	defer listener.Close()
	served := make(chan error, 1)
	go func() {
		conn, err := listener.Accept()
		if err != nil {
			served <- err
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if err := conn.(*tls.Conn).Handshake(); err != nil {
			served <- fmt.Errorf("server: %v", err)
			return
		}
		_, err = io.WriteString(conn, "hello over mTLS\n")
		served <- err
	}()
	dialer := &net.Dialer{Timeout: 30 * time.Second}
	conn, err := tls.DialWithDialer(dialer, "tcp", listener.Addr().String(), &tls.Config{
		Certificates: []tls.Certificate{clientCert},
		RootCAs:      client.roots,
		ServerName:   "server.test",
	})
	if err != nil {
		<-served
		return fmt.Errorf("client: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := io.ReadAll(io.LimitReader(conn, 16))
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("client read: %v", err)
	}
	if err := <-served; err != nil {
		return err
	}
	if string(line) != "hello over mTLS\n" {
		return fmt.Errorf("client read %q", line)
	}
	return nil
}
